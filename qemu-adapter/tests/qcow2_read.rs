//! Images read straight from their files ([`vbackup_qemu::qcow2`]) read as QEMU reads them:
//! byte for byte what `qemu-img convert -O raw` gives, through backing chains of qcow2 (versions
//! 2 and 3, small and large clusters) and raw layers, zero clusters, a grown top and relative
//! backing names; their layers are what `qemu-img info --backing-chain` shows. What is not read
//! there (compressed clusters) is refused, and the digest then goes through qemu-nbd.

mod tools_support;

use std::path::Path;

use tools_support::{qemu_in, raw_content};
use vbackup_core::catalogue::{BlockHashes, DigestKind};
use vbackup_core::model::ImageFormat;
use vbackup_qemu::digest::block_hashes;
use vbackup_qemu::images::backing_chain;
use vbackup_qemu::qcow2::{Chain, ReadError};

const KIND: DigestKind = DigestKind::NEW_IMAGES;

fn read_all(chain: &Chain) -> Vec<u8> {
    let pieces = chain.resolve(0, chain.size()).unwrap();
    let mut buf = vec![0xAAu8; chain.size() as usize];
    chain.read(&pieces, &mut buf).unwrap();
    buf
}

fn io(image: &str, commands: &[&str], dir: &Path) {
    let mut args = vec!["-f", "qcow2"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(image);
    qemu_in(Some(dir), "qemu-io", &args);
}

#[test]
fn a_chain_of_raw_and_qcow2_layers_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A raw bottom of 24 MiB with data in a few places, holes elsewhere.
    let base = d.join("base.raw");
    std::fs::write(&base, b"").unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    f.set_len(24 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 300_000], 5 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[8u8; 1000], (24 << 20) - 1000).unwrap();
    drop(f);
    // A qcow2 v3 with 4 KiB clusters on it, by a relative name; then a 2 MiB-cluster top,
    // grown to 40 MiB, by a relative name too.
    qemu_in(
        Some(d),
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-F",
            "raw",
            "-b",
            "base.raw",
            "mid.qcow2",
        ],
    );
    io(
        "mid.qcow2",
        &[
            "write -P 1 4095 10000",
            "write -z 5M 64k",
            "write -P 2 20M 3M",
        ],
        d,
    );
    qemu_in(
        Some(d),
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "-F",
            "qcow2",
            "-b",
            "mid.qcow2",
            "top.qcow2",
            "40M",
        ],
    );
    io(
        "top.qcow2",
        &[
            "write -P 3 1M 512",
            "write -z 21M 2M",
            "write -P 4 23M 100k",
            "write -P 5 39M 1M",
            "write -z 30M 4M",
        ],
        d,
    );
    let top = d.join("top.qcow2");
    let chain = Chain::open(&top, &ImageFormat::Qcow2).unwrap();
    assert_eq!(chain.size(), 40 << 20);
    assert_eq!(read_all(&chain), raw_content(&top, d));

    // Pieces of a range inside one layer and across layers.
    let pieces = chain.resolve(4 << 20, 3 << 20).unwrap();
    let mut buf = vec![0u8; 3 << 20];
    chain.read(&pieces, &mut buf).unwrap();
    assert_eq!(buf, raw_content(&top, d)[4 << 20..7 << 20]);

    // The layers as qemu-img shows them.
    let shown = backing_chain(&top).unwrap();
    let read = chain.layers();
    assert_eq!(read.len(), 3);
    for (r, s) in read.iter().zip(&shown) {
        assert_eq!(r.format, s.format);
        assert_eq!(r.virtual_size_bytes, s.virtual_size_bytes);
        assert_eq!(r.actual_size_bytes, s.actual_size_bytes);
        assert_eq!(
            r.backing
                .as_deref()
                .map(|b| std::fs::canonicalize(b).unwrap()),
            s.backing
                .as_deref()
                .map(|b| std::fs::canonicalize(b).unwrap())
        );
    }
    // What the top holds itself.
    assert!(chain.top_unallocated(5 << 20, 1 << 20).unwrap());
    assert!(!chain.top_unallocated(0, 2 << 20).unwrap());
    assert!(
        !chain.top_unallocated(30 << 20, 1 << 20).unwrap(),
        "zero clusters"
    );

    // The digest, read here, is the content's, of either tree kind (records made before
    // BLAKE3 keep SHA-256).
    for kind in [KIND, DigestKind::Sha256Tree] {
        let expected = BlockHashes::of_content(kind, &raw_content(&top, d));
        let mut heard = 0;
        let got = block_hashes(&top, &ImageFormat::Qcow2, kind, None, &mut |n| heard += n).unwrap();
        assert_eq!(got, expected);
        assert_eq!(heard, 40 << 20);
    }
}

#[test]
fn version_2_images_and_large_clusters_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, options) in [
        ("v2.qcow2", "compat=0.10"),
        ("big.qcow2", "cluster_size=2M,lazy_refcounts=on"),
    ] {
        qemu_in(
            Some(d),
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", options, name, "9M"],
        );
        io(
            name,
            &[
                "write -P 9 0 1",
                "write -P 10 3M 2M",
                "write -z 4M 64k",
                "write -P 11 8388607 1",
            ],
            d,
        );
        let path = d.join(name);
        let chain = Chain::open(&path, &ImageFormat::Qcow2).unwrap();
        assert_eq!(read_all(&chain), raw_content(&path, d), "{name}");
    }
}

#[test]
fn compressed_clusters_are_left_to_qemu_nbd_and_the_digest_is_still_the_contents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_in(
        Some(d),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "plain.qcow2", "5M"],
    );
    io("plain.qcow2", &["write -P 12 1M 2M"], d);
    qemu_in(
        Some(d),
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "plain.qcow2",
            "packed.qcow2",
        ],
    );
    let packed = d.join("packed.qcow2");
    let chain = Chain::open(&packed, &ImageFormat::Qcow2).unwrap();
    assert!(matches!(
        chain.resolve(0, chain.size()),
        Err(ReadError::Unsupported(_))
    ));
    let got = block_hashes(&packed, &ImageFormat::Qcow2, KIND, None, &mut |_| {}).unwrap();
    assert_eq!(got, BlockHashes::of_content(KIND, &raw_content(&packed, d)));
}
