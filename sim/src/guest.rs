//! Guest I/O: writes and reads by a device, a writable export or a node name, at any moment
//! (also while jobs run), and the HMP `qemu-io` command libvirt's test harness used.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::args::Args;
use crate::errors::QmpError;
use crate::image::{Cluster, FileContent, LogicalImage, MAX_CHAIN_DEPTH, RAW_CHUNK};
use crate::node::{Driver, IoError};
use crate::qemu::Qemu;

impl Qemu {
    /// The node a writer named `target` sits on: a device (id or qdev path), a writable
    /// export (id or NBD name), or a node name (a backup filter above it takes its place).
    fn resolve_writer(&self, target: &str) -> Result<String, IoError> {
        if let Some(d) = self
            .st
            .devices
            .iter()
            .find(|d| d.id == target || d.qdev == target)
        {
            return Ok(d.node.clone());
        }
        if let Some(e) = self
            .st
            .exports
            .values()
            .find(|e| e.writable && (e.id == target || e.name == target))
        {
            return Ok(e.node.clone());
        }
        if self.st.nodes.contains_key(target) {
            return Ok(self.current_top_of(target));
        }
        Err(IoError::NotFound(target.to_string()))
    }

    /// A guest write of `data` at `offset` through `target` at virtual time `now_ms`: every node
    /// on the way records it in its recording bitmaps, and running backups save the old data
    /// first.
    pub fn guest_write(
        &mut self,
        now_ms: u64,
        target: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), IoError> {
        if !self.running {
            return Err(IoError::NotRunning);
        }
        self.advance(now_ms);
        let node = self.resolve_writer(target)?;
        let size = self.node_size(&node);
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(IoError::OutOfRange { offset, len, size });
        }
        if self.node(&node).is_some_and(|n| n.read_only) {
            return Err(IoError::ReadOnly(node));
        }
        self.write_node(&node, offset, data)?;
        // A copy-before-write failure ends its job at once.
        let now = self.now_ms;
        self.run_jobs_until(now);
        Ok(())
    }

    /// `qemu-io -c 'write -P PATTERN OFFSET LEN'` through `target`.
    pub fn guest_write_pattern(
        &mut self,
        now_ms: u64,
        target: &str,
        offset: u64,
        len: u64,
        pattern: u8,
    ) -> Result<(), IoError> {
        self.guest_write(now_ms, target, offset, &vec![pattern; len as usize])
    }

    /// Reads what the guest sees through `target`.
    pub fn guest_read(&self, target: &str, offset: u64, len: u64) -> Result<Vec<u8>, IoError> {
        if !self.running {
            return Err(IoError::NotRunning);
        }
        let node = self.resolve_writer(target)?;
        let size = self.node_size(&node);
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(IoError::OutOfRange { offset, len, size });
        }
        let mut buf = vec![0u8; len as usize];
        self.read_node(&node, offset, &mut buf);
        Ok(buf)
    }

    /// The whole disk as the guest sees it through `target`.
    pub fn guest_disk(&self, target: &str) -> Result<Vec<u8>, IoError> {
        let node = self.resolve_writer(target)?;
        self.guest_read(target, 0, self.node_size(&node))
    }

    /// The whole disk as the guest sees it through `target`, as shared clusters: a cluster an
    /// image of the chain stores whole is taken by reference (no bytes copied), any other is
    /// read through the graph. Equal to [`Qemu::guest_disk`] byte for byte, and so cheap that
    /// a checker can keep one per point in time.
    pub fn guest_snapshot(&self, target: &str) -> Result<LogicalImage, IoError> {
        if !self.running {
            return Err(IoError::NotRunning);
        }
        let node = self.resolve_writer(target)?;
        let size = self.node_size(&node);
        let cs = self.chain_cluster_size(&node);
        let mut image = LogicalImage::from_clusters(size, cs, BTreeMap::new());
        let mut buf = Vec::new();
        for idx in 0..size.div_ceil(cs) {
            let offset = idx * cs;
            let len = cs.min(size - offset);
            let shared = if len == cs {
                self.shared_cluster(&node, offset, cs)
            } else {
                None
            };
            match shared {
                Some(Some(Cluster::Data(d))) => image.set_cluster(idx, Cluster::Data(d)),
                Some(Some(Cluster::Zero) | None) => {}
                None => {
                    buf.clear();
                    buf.resize(cs as usize, 0);
                    self.read_node(&node, offset, &mut buf[..len as usize]);
                    if buf.iter().any(|b| *b != 0) {
                        image.set_cluster(idx, Cluster::Data(Arc::new(buf.clone())));
                    }
                }
            }
        }
        Ok(image)
    }

    /// The cluster size of the first qcow2 image under `node` (through filters), or the raw
    /// chunk size.
    fn chain_cluster_size(&self, node: &str) -> u64 {
        let mut cur = node.to_string();
        for _ in 0..MAX_CHAIN_DEPTH {
            let Some(n) = self.node(&cur) else { break };
            match &n.driver {
                Driver::Qcow2 => {
                    if let Some(FileContent::Qcow2(q)) =
                        self.image_path(&cur).and_then(|p| self.fs().get(&p))
                    {
                        return q.cluster_size;
                    }
                    break;
                }
                Driver::CopyBeforeWrite { .. } | Driver::Raw { offset: 0 } => match &n.file {
                    Some(f) => cur = f.clone(),
                    None => break,
                },
                _ => break,
            }
        }
        RAW_CHUNK
    }

    pub(crate) fn cmd_hmp(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["command-line", "cpu-index"])?;
        let line = a.str("command-line")?;
        let words = split_words(line);
        if words.first().map(String::as_str) != Some("qemu-io") {
            let first = words.first().cloned().unwrap_or_default();
            return Ok(json!(format!("unknown command: '{first}'\r\n")));
        }
        let rest: Vec<&String> = words[1..].iter().filter(|w| *w != "-d").collect();
        let (Some(device), Some(cmd)) = (rest.first(), rest.get(1)) else {
            return Ok(json!("Parameter 'device' is missing\r\n"));
        };
        let c = split_words(cmd);
        let now = self.now_ms;
        match parse_write(&c) {
            Some((offset, len, pattern)) => match self
                .guest_write_pattern(now, device, offset, len, pattern)
            {
                Ok(()) => Ok(json!("")),
                Err(IoError::NotFound(_)) => Ok(json!(format!("Device '{device}' not found\r\n"))),
                Err(e) => Ok(json!(format!("write failed: {e}\r\n"))),
            },
            None => Ok(json!(format!("qemu-io: command not modelled: {cmd}\r\n"))),
        }
    }
}

/// Splits a command line into words, honouring double quotes.
fn split_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// `write [-P PATTERN | -z] OFFSET LEN` → (offset, len, pattern byte).
fn parse_write(words: &[String]) -> Option<(u64, u64, u8)> {
    if words.first()? != "write" {
        return None;
    }
    let mut pattern = 0xcd; // qemu-io's default pattern
    let mut pos = Vec::new();
    let mut i = 1;
    while i < words.len() {
        match words[i].as_str() {
            "-P" => {
                let p = words.get(i + 1)?;
                pattern = parse_number(p)? as u8;
                i += 2;
            }
            "-z" => {
                pattern = 0;
                i += 1;
            }
            w => {
                pos.push(parse_size(w)?);
                i += 1;
            }
        }
    }
    match pos.as_slice() {
        [off, len] => Some((*off, *len, pattern)),
        _ => None,
    }
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A size with an optional K/M/G/T suffix (powers of 1024), as qemu-io reads it.
fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        't' | 'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    parse_number(num)?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_io_write_commands_parse_like_qemu_io() {
        let w = split_words(
            r#"qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0xee 32M 64K""#,
        );
        assert_eq!(w.len(), 4);
        assert_eq!(
            parse_write(&split_words(&w[3])),
            Some((32 << 20, 64 << 10, 0xee))
        );
        assert_eq!(
            parse_write(&split_words("write -z 0 512")),
            Some((0, 512, 0))
        );
        assert_eq!(parse_write(&split_words("read 0 512")), None);
        assert_eq!(parse_size("1G"), Some(1 << 30));
    }
}
