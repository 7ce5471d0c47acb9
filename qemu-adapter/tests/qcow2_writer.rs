//! New qcow2 images written straight into their files ([`vbackup_qemu::qcow2_writer`]) are
//! images QEMU accepts (`qemu-img check` finds no error or leak) and hold exactly what was
//! written: in any order, with zero runs, a partial last cluster, over a backing file whose data
//! the written clusters hide, and with refcounts spanning several refcount blocks.

mod tools_support;

use std::path::Path;

use tools_support::{qemu, raw_content};
use vbackup_core::model::ImageFormat;
use vbackup_qemu::nbd::copy::ExtentSink;
use vbackup_qemu::qcow2::Chain;
use vbackup_qemu::qcow2_writer::{NewImage, set_backing};

fn check(image: &Path) {
    let out = qemu("qemu-img", &["check", image.to_str().unwrap()]);
    assert!(out.contains("No errors were found"), "{out}");
}

fn content(image: &Path) -> Vec<u8> {
    raw_content(image, image.parent().unwrap())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn a_full_image_holds_what_was_written_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.qcow2");
    let size = (40u64 << 20) + 12800;
    let ranges = [(5u64 << 20, 3u64 << 20), (0, 100_000), (40 << 20, 12800)];
    assert!(NewImage::fits(&ranges, size, false));
    let mut image = NewImage::create(&path, size, None, &ranges).unwrap();
    let mut expected = vec![0u8; size as usize];
    let a = pattern(3 << 20, 1);
    let b = pattern(100_000, 2);
    let c = pattern(12800, 3);
    // The 3 MiB range in two pieces, the second first, with a zero run between.
    image
        .write_data((6 << 20) + 4096, &a[(1 << 20) + 4096..])
        .unwrap();
    image.write_zeroes(6 << 20, 4096).unwrap();
    image.write_data(5 << 20, &a[..1 << 20]).unwrap();
    expected[(5 << 20)..(6 << 20)].copy_from_slice(&a[..1 << 20]);
    expected[(6 << 20) + 4096..(8 << 20)].copy_from_slice(&a[(1 << 20) + 4096..]);
    image.write_data(0, &b).unwrap();
    expected[..100_000].copy_from_slice(&b);
    image.write_data(40 << 20, &c).unwrap();
    expected[(40 << 20) as usize..].copy_from_slice(&c);
    // Outside the ranges laid out: refused.
    assert!(image.write_data(20 << 20, &[1]).is_err());
    assert!(image.write_data(size - 1, &[1, 2]).is_err());
    image.sync().unwrap();
    drop(image);
    check(&path);
    assert_eq!(content(&path), expected);
    let chain = Chain::open(&path, &ImageFormat::Qcow2).unwrap();
    assert_eq!(chain.size(), size);
    // An existing file is never replaced.
    assert!(NewImage::create(&path, size, None, &ranges).is_err());
}

#[test]
fn an_overlay_hides_its_backing_file_where_it_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.qcow2");
    let p = parent.to_str().unwrap();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", p, "8M"]);
    qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 9 0 8M", p]);
    let path = dir.path().join("inc.qcow2");
    // The disk grew to 10 MiB; two cluster-aligned dirty ranges, one of them zero in part.
    let size = 10u64 << 20;
    let ranges = [(1u64 << 20, 128u64 << 10), (7 << 20, 2 << 20)];
    assert!(NewImage::fits(&ranges, size, true));
    assert!(!NewImage::fits(&[(4096, 65536)], size, true));
    let mut image = NewImage::create(&path, size, Some(&parent), &ranges).unwrap();
    let d = pattern(128 << 10, 5);
    image.write_data(1 << 20, &d).unwrap();
    image.write_zeroes(7 << 20, 1 << 20).unwrap();
    let e = pattern(1 << 20, 6);
    image.write_data(8 << 20, &e).unwrap();
    image.sync().unwrap();
    drop(image);
    check(&path);
    let info = qemu("qemu-img", &["info", path.to_str().unwrap()]);
    assert!(
        info.contains(&format!("backing file: {p}")) && info.contains("backing file format: qcow2"),
        "{info}"
    );
    let mut expected = vec![9u8; 8 << 20];
    expected.resize(size as usize, 0);
    expected[(1 << 20)..(1 << 20) + (128 << 10)].copy_from_slice(&d);
    expected[(7 << 20)..(8 << 20)].fill(0);
    expected[(8 << 20)..(9 << 20)].copy_from_slice(&e);
    assert_eq!(content(&path), expected);
}

#[test]
fn refcounts_spanning_several_blocks_and_a_sparse_64_gib_image_check_clean() {
    let dir = tempfile::tempdir().unwrap();
    // 2.5 GiB allocated (never written: holes) needs two refcount blocks.
    let big = dir.path().join("big.qcow2");
    let size = 3u64 << 30;
    NewImage::create(&big, size, None, &[(0, 5 << 29)])
        .unwrap()
        .sync()
        .unwrap();
    check(&big);
    // 64 GiB with a little data far apart.
    let sparse = dir.path().join("sparse.qcow2");
    let size = 64u64 << 30;
    let ranges = [(0u64, 65536u64), (size - 65536, 65536)];
    let mut image = NewImage::create(&sparse, size, None, &ranges).unwrap();
    image.write_data(size - 65536, &pattern(65536, 7)).unwrap();
    image.sync().unwrap();
    drop(image);
    check(&sparse);
    let chain = Chain::open(&sparse, &ImageFormat::Qcow2).unwrap();
    let pieces = chain.resolve(size - 65536, 65536).unwrap();
    let mut buf = vec![0u8; 65536];
    chain.read(&pieces, &mut buf).unwrap();
    assert_eq!(buf, pattern(65536, 7));
}

#[test]
fn setting_the_backing_file_changes_the_header_as_qemu_img_rebase_u_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (old, new, top) = (d("old.qcow2"), d("new.qcow2"), d("top.qcow2"));
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", &old, "4M"]);
    qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 4M", &old]);
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", &new, "4M"]);
    qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 2 0 4M", &new]);
    // An image without backing file (as QEMU writes a push target), with a bitmap extension
    // that must survive, and data of its own in the middle.
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", &top, "4M"]);
    qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 3 1M 1M", &top]);
    qemu("qemu-img", &["bitmap", "--add", &top, "b0"]);
    assert!(set_backing(Path::new(&top), Some(Path::new(&new))).unwrap());
    check(Path::new(&top));
    let info = qemu("qemu-img", &["info", &top]);
    assert!(
        info.contains(&format!("backing file: {new}"))
            && info.contains("backing file format: qcow2")
            && info.contains("b0"),
        "{info}"
    );
    let mut expected = vec![2u8; 4 << 20];
    expected[1 << 20..2 << 20].fill(3);
    assert_eq!(content(Path::new(&top)), expected);
    // Another backing file, by a longer name; then none.
    let longer = d("a-much-longer-name-for-the-old-image.qcow2");
    std::fs::rename(&old, &longer).unwrap();
    assert!(set_backing(Path::new(&top), Some(Path::new(&longer))).unwrap());
    check(Path::new(&top));
    expected[..1 << 20].fill(1);
    expected[2 << 20..].fill(1);
    assert_eq!(content(Path::new(&top)), expected);
    assert!(set_backing(Path::new(&top), None).unwrap());
    check(Path::new(&top));
    let info = qemu("qemu-img", &["info", &top]);
    assert!(!info.contains("backing file"), "{info}");
    let mut alone = vec![0u8; 4 << 20];
    alone[1 << 20..2 << 20].fill(3);
    assert_eq!(content(Path::new(&top)), alone);
}
