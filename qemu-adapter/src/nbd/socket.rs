//! The thin blocking socket loop around the sans-IO handshake and codec.
//!
//! One connection, one thread, no runtime: requests are written in batches up to the window,
//! then replies are read and decoded until there is room for more. Read data goes from the
//! receive buffer straight to the caller's sink.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;

use vbackup_core::export::{ExportReader, Extent};

use super::client::{DEFAULT_WINDOW, Event, Transmission};
use super::copy::ExtentSink;
use super::error::{NbdError, RequestError};
use super::handshake::{ExportInfo, Handshake, HandshakeConfig};

/// Size of the receive buffer. Large reads from the socket mean fewer system calls and larger
/// writes into the sink.
const RECV_BUFFER_BYTES: usize = 1 << 20;
/// Default size of one read request in bulk copies.
pub const DEFAULT_REQUEST_BYTES: u32 = 1 << 20;
/// Largest length asked for in one block status request.
const MAX_BLOCK_STATUS_BYTES: u64 = 1 << 31;

#[derive(Debug)]
enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let r = match self {
                Socket::Unix(s) => s.read(buf),
                Socket::Tcp(s) => s.read(buf),
            };
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Socket::Unix(s) => s.write_all(buf),
            Socket::Tcp(s) => s.write_all(buf),
        }
    }

    fn set_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
        match self {
            Socket::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Socket::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Socket::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }
}

/// A connected NBD client in transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    socket: Socket,
    info: ExportInfo,
    codec: Transmission,
    recv: Box<[u8]>,
    recv_start: usize,
    recv_end: usize,
    send: Vec<u8>,
    request_bytes: u32,
    broken: bool,
    write_failure: Option<RequestError>,
}

impl NbdClient {
    /// Connects over a unix socket and negotiates `export` with the given meta contexts.
    pub fn connect_unix(
        path: impl AsRef<Path>,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<Self, NbdError> {
        let stream = UnixStream::connect(path)?;
        Self::handshake(Socket::Unix(stream), export, meta_contexts)
    }

    /// Connects over TCP and negotiates `export` with the given meta contexts.
    pub fn connect_tcp(
        host: &str,
        port: u16,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<Self, NbdError> {
        let stream = TcpStream::connect((host, port))?;
        // Requests are small and latency-bound; do not let Nagle hold them back.
        stream.set_nodelay(true)?;
        Self::handshake(Socket::Tcp(stream), export, meta_contexts)
    }

    fn handshake(
        mut socket: Socket,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<Self, NbdError> {
        let mut hs = Handshake::new(HandshakeConfig {
            export: export.to_string(),
            meta_contexts: meta_contexts.iter().map(|s| s.to_string()).collect(),
        })?;
        let mut buf = vec![0u8; 64 * 1024];
        while hs.wants_input() {
            let n = socket.read(&mut buf)?;
            if n == 0 {
                return Err(hs.receive_eof().into());
            }
            let step = hs.receive(&buf[..n]);
            let out = hs.take_output();
            if !out.is_empty() {
                socket.write_all(&out)?;
            }
            if let Err(e) = step {
                // Best effort: the error to report is the handshake's, not the abort's.
                let _ = socket.write_all(&hs.abort_bytes());
                let _ = socket.shutdown();
                return Err(e.into());
            }
        }
        let (info, leftover) = hs.finish()?;
        if !leftover.is_empty() {
            return Err(NbdError::Protocol(super::error::ProtocolError::Unsolicited));
        }
        let codec = Transmission::new(&info, DEFAULT_WINDOW);
        Ok(Self {
            socket,
            codec,
            info,
            recv: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            recv_start: 0,
            recv_end: 0,
            send: Vec::with_capacity(64 * 1024),
            request_bytes: DEFAULT_REQUEST_BYTES,
            broken: false,
            write_failure: None,
        })
    }

    /// What the handshake negotiated.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Bounds every socket read and write: a server that stalls longer makes the operation fail
    /// with [`NbdError::Io`] (kind `WouldBlock` or `TimedOut`) and the client unusable, instead
    /// of blocking forever. `None` (the default) waits indefinitely.
    pub fn set_io_timeout(&mut self, timeout: Option<std::time::Duration>) -> Result<(), NbdError> {
        self.socket.set_timeout(timeout)?;
        Ok(())
    }

    /// Sets how many requests may be in flight and how large one bulk read request is
    /// (clamped to what the server accepts). Only while idle.
    pub fn set_pipeline(&mut self, window: usize, request_bytes: u32) {
        if self.codec.in_flight() == 0 && !self.codec.is_closed() {
            self.codec = Transmission::new(&self.info, window);
        }
        // The server's maximum may be tiny; never let a hostile announcement panic the clamp.
        self.request_bytes = request_bytes.clamp(1, self.codec.max_request_bytes().max(1));
    }

    fn usable(&self) -> Result<(), NbdError> {
        if self.broken || self.codec.is_closed() {
            return Err(RequestError::Closed.into());
        }
        Ok(())
    }

    fn flush_send(&mut self) -> Result<(), NbdError> {
        if !self.send.is_empty() {
            let r = self.socket.write_all(&self.send);
            self.send.clear();
            if let Err(e) = r {
                self.broken = true;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Reads once from the socket (if nothing is buffered) and hands every decoded event to
    /// `on_event`. Handlers record failures themselves and keep accepting events, so decoding
    /// goes on and the stream stays in sync.
    fn pump(&mut self, on_event: &mut dyn FnMut(Event<'_>)) -> Result<(), NbdError> {
        if self.recv_start == self.recv_end {
            let n = match self.socket.read(&mut self.recv) {
                Ok(n) => n,
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            };
            if n == 0 {
                self.broken = true;
                return Err(NbdError::Closed {
                    in_flight: self.codec.in_flight(),
                });
            }
            self.recv_start = 0;
            self.recv_end = n;
        }
        loop {
            let input = &self.recv[self.recv_start..self.recv_end];
            let (used, event) = match self.codec.decode(input) {
                Ok(x) => x,
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            };
            self.recv_start += used;
            match event {
                Some(ev) => on_event(ev),
                None => return Ok(()),
            }
        }
    }

    /// Reads the given ranges (offset, length) with up to the window of requests in flight and
    /// hands the data to `sink`: data as it arrives, holes as zero runs. Ranges longer than one
    /// request are split. Returns the bytes delivered (data and zeroes). On the first failure no
    /// more requests are sent, the outstanding replies are drained, and the failure is returned.
    pub fn copy_extents(
        &mut self,
        ranges: &[(u64, u64)],
        sink: &mut dyn ExtentSink,
    ) -> Result<u64, NbdError> {
        self.usable()?;
        let step = u64::from(self.request_bytes.min(self.codec.max_request_bytes()));
        let mut next_range = 0usize;
        let mut pos = ranges.first().map_or(0, |r| r.0);
        let mut delivered = 0u64;
        let mut failure: Option<NbdError> = None;
        loop {
            while failure.is_none() && self.codec.can_send() && next_range < ranges.len() {
                let (start, length) = ranges[next_range];
                let end = start.saturating_add(length);
                if pos >= end {
                    next_range += 1;
                    if let Some(r) = ranges.get(next_range) {
                        pos = r.0;
                    }
                    continue;
                }
                let len = (end - pos).min(step) as u32;
                if let Err(e) = self.codec.read(pos, len, &mut self.send) {
                    failure = Some(e.into());
                    break;
                }
                pos += u64::from(len);
            }
            self.flush_send()?;
            if self.codec.in_flight() == 0 {
                break;
            }
            let mut on_event = |ev: Event<'_>| {
                if failure.is_some() {
                    return;
                }
                let r = match ev {
                    Event::ReadData { offset, data, .. } => {
                        delivered += data.len() as u64;
                        sink.write_data(offset, data).map_err(NbdError::Sink)
                    }
                    Event::ReadHole { offset, length, .. } => {
                        delivered += u64::from(length);
                        sink.write_zeroes(offset, u64::from(length))
                            .map_err(NbdError::Sink)
                    }
                    Event::Done { result, .. } => result.map_err(NbdError::from),
                    Event::BlockStatus { .. } => Ok(()),
                };
                if let Err(e) = r {
                    failure = Some(e);
                }
            };
            self.pump(&mut on_event)?;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(delivered),
        }
    }

    /// Reads `buf.len()` bytes at `offset` (pipelined when longer than one request).
    pub fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut sink = BufferSink { base: offset, buf };
        self.copy_extents(&[(offset, sink.buf.len() as u64)], &mut sink)?;
        Ok(())
    }

    /// Block status of one negotiated meta context from `offset`, at most `length` bytes (one
    /// request). Extents are clipped to the requested range so callers never see more than they
    /// asked for, and never past the export.
    pub fn block_status_of(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        self.usable()?;
        let id = self
            .info
            .context_id(context)
            .ok_or_else(|| RequestError::ContextNotNegotiated(context.to_string()))?;
        let length = length
            .min(MAX_BLOCK_STATUS_BYTES)
            .min(self.info.size.saturating_sub(offset));
        self.codec
            .block_status(offset, length as u32, &mut self.send)?;
        self.flush_send()?;
        let mut extents: Option<Vec<Extent>> = None;
        let mut done: Option<Result<(), RequestError>> = None;
        while done.is_none() {
            let mut on_event = |ev: Event<'_>| match ev {
                Event::BlockStatus {
                    context_id,
                    extents: e,
                    ..
                } if context_id == id => extents = Some(e),
                Event::Done { result, .. } => done = Some(result),
                _ => {}
            };
            self.pump(&mut on_event)?;
        }
        if let Some(Err(e)) = done {
            return Err(e.into());
        }
        let mut clipped = Vec::new();
        let mut left = length;
        for e in extents.ok_or(RequestError::NoExtents)? {
            if left == 0 {
                break;
            }
            let l = e.length.min(left);
            clipped.push(Extent {
                length: l,
                flags: e.flags,
            });
            left -= l;
        }
        Ok(clipped)
    }

    /// Writes `data` at `offset` and waits for every reply (pipelined when longer than one
    /// request).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.submit_write(offset, data)?;
        self.wait_writes()
    }

    /// Sends writes of `data` at `offset` without waiting for their replies, except to make room
    /// in the window. A failure the server reports for an earlier write is returned by a later
    /// call or by [`NbdClient::wait_writes`].
    pub fn submit_write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.usable()?;
        let step = self
            .codec
            .max_request_bytes()
            .min(self.request_bytes.max(1 << 20)) as usize;
        for (i, piece) in data.chunks(step).enumerate() {
            self.make_room()?;
            self.codec
                .write(offset + (i * step) as u64, piece, &mut self.send)?;
            // Send at once: a write carries its payload, and holding many back gains nothing.
            self.flush_send()?;
        }
        self.pending_write_failure()
    }

    /// Sends `NBD_CMD_WRITE_ZEROES` requests for the range without waiting for their replies,
    /// or plain writes of zeroes when the export does not accept the command.
    pub fn submit_write_zeroes(&mut self, offset: u64, length: u64) -> Result<(), NbdError> {
        self.usable()?;
        if self.info.transmission_flags & super::proto::tflag::SEND_WRITE_ZEROES == 0 {
            let zeroes = vec![0u8; length.min(1 << 20) as usize];
            let end = offset.saturating_add(length);
            let mut at = offset;
            while at < end {
                let n = (end - at).min(zeroes.len() as u64);
                self.submit_write(at, &zeroes[..n as usize])?;
                at += n;
            }
            return Ok(());
        }
        // One request covers at most 2 GiB, well inside the 32-bit length field.
        let step = 1u64 << 31;
        let end = offset.saturating_add(length);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(step);
            self.make_room()?;
            self.codec.write_zeroes(at, n as u32, &mut self.send)?;
            self.flush_send()?;
            at += n;
        }
        self.pending_write_failure()
    }

    /// Waits for the replies of every submitted write; returns the first failure.
    pub fn wait_writes(&mut self) -> Result<(), NbdError> {
        while self.codec.in_flight() > 0 {
            self.pump_writes()?;
        }
        self.pending_write_failure()
    }

    fn make_room(&mut self) -> Result<(), NbdError> {
        while !self.codec.can_send() && self.codec.in_flight() > 0 {
            self.pump_writes()?;
        }
        Ok(())
    }

    fn pump_writes(&mut self) -> Result<(), NbdError> {
        let mut failure = self.write_failure.take();
        let mut on_event = |ev: Event<'_>| {
            if let Event::Done { result: Err(e), .. } = ev {
                failure.get_or_insert(e);
            }
        };
        let r = self.pump(&mut on_event);
        self.write_failure = failure;
        r
    }

    fn pending_write_failure(&mut self) -> Result<(), NbdError> {
        match self.write_failure.take() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Asks the server to make written data durable.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.usable()?;
        self.codec.flush(&mut self.send)?;
        self.flush_send()?;
        let mut done = None;
        while done.is_none() {
            let mut on_event = |ev: Event<'_>| {
                if let Event::Done { result, .. } = ev {
                    done = Some(result);
                }
            };
            self.pump(&mut on_event)?;
        }
        done.unwrap_or(Ok(())).map_err(NbdError::from)
    }

    /// Sends `NBD_CMD_DISC` and closes the socket. The server answers nothing; it sees a clean
    /// end of the session rather than a dropped connection.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.usable()?;
        self.codec.disconnect(&mut self.send);
        self.flush_send()?;
        self.socket.shutdown()?;
        Ok(())
    }
}

/// Copies read data into a caller's buffer.
struct BufferSink<'a> {
    base: u64,
    buf: &'a mut [u8],
}

impl BufferSink<'_> {
    fn slot(&mut self, offset: u64, length: u64) -> std::io::Result<&mut [u8]> {
        let start = offset
            .checked_sub(self.base)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|s| {
                s.checked_add(length as usize)
                    .is_some_and(|e| e <= self.buf.len())
            });
        match start {
            Some(s) => Ok(&mut self.buf[s..s + length as usize]),
            None => Err(std::io::Error::other("read reply outside the buffer")),
        }
    }
}

impl ExtentSink for BufferSink<'_> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.slot(offset, data.len() as u64)?.copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        self.slot(offset, length)?.fill(0);
        Ok(())
    }
}

impl ExportReader for NbdClient {
    type Error = NbdError;

    fn size(&self) -> u64 {
        self.info.size
    }

    fn meta_contexts(&self) -> Vec<String> {
        if self.info.available_contexts.is_empty() {
            self.info.contexts.iter().map(|c| c.name.clone()).collect()
        } else {
            self.info.available_contexts.clone()
        }
    }

    fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, Self::Error> {
        self.block_status_of(context, offset, length)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.read_exact_at(offset, buf)
    }
}
