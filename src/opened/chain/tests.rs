// Test-only code, working on values it made itself.
#![allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::unwrap_used
)]

use super::*;

#[test]
fn path_combine_like_qemu() {
    assert_eq!(path_combine("top.qcow2", "mid.qcow2"), "mid.qcow2");
    assert_eq!(path_combine("a/top.qcow2", "mid.qcow2"), "a/mid.qcow2");
    assert_eq!(path_combine("/x/top.qcow2", "/y/b.raw"), "/y/b.raw");
    assert_eq!(path_combine("./t.qcow2", "../b"), "./../b");
    assert_eq!(
        resolve_relative(Path::new("dir/top.qcow2"), "b.raw"),
        PathBuf::from("dir/b.raw")
    );
    assert_eq!(
        resolve_relative(Path::new("top.qcow2"), "b.raw"),
        PathBuf::from("b.raw")
    );
}

#[test]
fn backing_names_resolve_like_qemu() {
    let img = Path::new("dir/top.qcow2");
    let plain = resolve_backing(img, "base.qcow2").unwrap();
    assert_eq!(plain.path, PathBuf::from("dir/base.qcow2"));
    assert_eq!(
        resolve_backing(img, "dir2/a:b").unwrap().path,
        PathBuf::from("dir/dir2/a:b")
    );
    // file: and json: names are not combined with the image's directory.
    assert_eq!(
        resolve_backing(img, "file:base.qcow2").unwrap().path,
        PathBuf::from("base.qcow2")
    );
    let nested = resolve_backing(
        img,
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"b.qcow2"}}"#,
    )
    .unwrap();
    assert_eq!(
        nested,
        Target {
            path: "b.qcow2".into(),
            format: Some(Format::Qcow2)
        }
    );
    let flat = resolve_backing(
        img,
        r#"json:{"driver":"raw","file.driver":"file","file.filename":"/x/b.raw"}"#,
    )
    .unwrap();
    assert_eq!(
        flat,
        Target {
            path: "/x/b.raw".into(),
            format: Some(Format::Raw)
        }
    );
    let proto_only = resolve_backing(img, r#"json:{"driver":"file","filename":"c"}"#);
    assert!(
        proto_only
            .unwrap_err()
            .contains("A block device must be specified")
    );
}

#[test]
fn unopenable_names_say_why() {
    let img = Path::new("top.qcow2");
    let e = resolve_backing(img, "nbd://host/x").unwrap_err();
    assert!(e.contains("'nbd' protocol"), "{e}");
    let e = resolve_backing(img, r#"json:{"driver":"nbd","host":"h"}"#).unwrap_err();
    assert!(e.contains("'nbd' driver"), "{e}");
    let e = resolve_backing(
        img,
        r#"json:{"driver":"qcow2","file":{"driver":"http","url":"u"}}"#,
    )
    .unwrap_err();
    assert!(e.contains("'http' driver"), "{e}");
    let e = resolve_backing(img, r#"json:{"driver":"qcow2","file":"node0"}"#).unwrap_err();
    assert!(e.contains("node 'node0'"), "{e}");
    let e = resolve_backing(
        img,
        r#"json:{"driver":"qcow2","data-file":"d","file":{"filename":"b"}}"#,
    )
    .unwrap_err();
    assert!(e.contains("'data-file'"), "{e}");
    assert!(resolve_backing(img, "json:{nope").is_err());
}

#[test]
fn a_missing_backing_file_is_refused_in_qemus_words() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = crate::testing::ImageBuilder::new(16, 1 << 20).bytes();
    let name = b"gone.qcow2";
    bytes[1024..1024 + name.len()].copy_from_slice(name);
    bytes[8..16].copy_from_slice(&1024u64.to_be_bytes());
    bytes[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    let top = dir.path().join("top.qcow2");
    std::fs::write(&top, bytes).unwrap();
    let Err(f) = Chain::open_detailed(&top, &OpenOptions::default()) else {
        panic!("a chain without its backing file opened");
    };
    let gone = dir.path().join("gone.qcow2");
    assert_eq!(f.depth, 1);
    assert_eq!(f.file, gone);
    assert_eq!(f.cause, FailureCause::Os(std::io::ErrorKind::NotFound));
    assert_eq!(
        f.qemu_reason(),
        Some(format!(
            "Could not open backing file: Could not open '{}': No such file or directory",
            gone.display()
        ))
    );
}
