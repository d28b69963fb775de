//! An image with an external data file: the words about its L2 entries name the
//! data file, where the data is, and not the image.

mod common;
use common::Work;

fn data_file_image(w: &Work, raw: bool) {
    let opts = if raw {
        "data_file=df.raw,data_file_raw=on"
    } else {
        "data_file=df.raw"
    };
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, "dfr.qcow2", "4M"]);
    w.qemu_io("dfr.qcow2", &["write 0 1M"]);
}

#[test]
fn dump_l2_names_the_data_file() {
    for raw in [true, false] {
        let w = Work::new();
        data_file_image(&w, raw);
        let t = String::from_utf8(w.qinspect_ok(&["dump", "l2", "dfr.qcow2", "0"])).unwrap();
        let row0 = t.lines().nth(2).unwrap();
        assert!(
            row0.ends_with("guest 0x0: data at host offset 0x0 in df.raw, COPIED"),
            "{t}"
        );
        let j = Work::json(&w.qinspect_ok(&["dump", "l2", "dfr.qcow2", "0", "--json"]));
        let e = j["entries"].as_array().unwrap();
        // Rows 0..16 map the 1 MiB written (with data_file_raw, qemu-img maps the
        // whole disk, 64 rows); the entries past the disk's end are all zeros.
        assert_eq!(e[0]["data_file"], "df.raw", "{j}");
        assert_eq!(e[0]["host_offset"], 0, "{j}");
        assert_eq!(e[15]["data_file"], "df.raw", "{j}");
        assert_eq!(e[16].get("data_file").is_some(), raw, "{j}");
        assert!(e[64].get("data_file").is_none(), "{j}");
    }
}

#[test]
fn dump_l2_without_data_file_has_no_data_file_key() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    w.qemu_io("a.qcow2", &["write 0 64k"]);
    let j = Work::json(&w.qinspect_ok(&["dump", "l2", "a.qcow2", "0", "--json"]));
    let e = j["entries"].as_array().unwrap();
    assert_eq!(e[0]["type"], "normal", "{j}");
    assert!(e[0].get("data_file").is_none(), "{j}");
    let t = String::from_utf8(w.qinspect_ok(&["dump", "l2", "a.qcow2", "0"])).unwrap();
    assert!(!t.contains(" in "), "{t}");
}

#[test]
fn trace_names_the_data_file_of_an_l2_entry() {
    let w = Work::new();
    data_file_image(&w, false);
    let t = String::from_utf8(w.qinspect_ok(&["trace", "dfr.qcow2", "0x10000"])).unwrap();
    let step = t.lines().find(|l| l.contains(". L2 table at ")).unwrap();
    assert!(
        step.ends_with("is 0x8000000000010000: data at host offset 0x10000 in df.raw, COPIED."),
        "{t}"
    );
    // Past the 1M written, with no backing file.
    let t = String::from_utf8(w.qinspect_ok(&["trace", "dfr.qcow2", "0x200000"])).unwrap();
    let step = t.lines().find(|l| l.contains(". L2 table at ")).unwrap();
    assert!(
        step.ends_with("is 0x0000000000000000: unallocated: reads as zeros: no backing file."),
        "{t}"
    );
}
