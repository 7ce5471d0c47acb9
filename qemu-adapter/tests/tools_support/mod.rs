//! Running the QEMU tools from the image tests: a missing tool or a failed run fails the test.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs `tool` with `args` (in `dir` when given) and returns what it printed.
pub fn qemu_in(dir: Option<&Path>, tool: &str, args: &[&str]) -> String {
    let mut command = Command::new(tool);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{tool} is needed by this test: {e}"));
    assert!(out.status.success(), "{tool} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`qemu_in`] the current directory.
pub fn qemu(tool: &str, args: &[&str]) -> String {
    qemu_in(None, tool, args)
}

/// The guest-visible content of `image`, by `qemu-img convert -O raw` into `dir`.
pub fn raw_content(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("content.raw");
    let _ = std::fs::remove_file(&raw);
    let (i, r) = (image.to_str().unwrap(), raw.to_str().unwrap());
    qemu("qemu-img", &["convert", "-O", "raw", i, r]);
    std::fs::read(raw).unwrap()
}
