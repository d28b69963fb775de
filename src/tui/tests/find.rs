//! Find and filter in lists.

use super::*;

// ---- issue 11 item 8: find and filter in lists --------------------------------------

fn qemu_map(dir: &str, image: &str) -> Vec<serde_json::Value> {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", image])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The guest clusters that qemu-img map says hold data of layer 0, under L1
/// entry `l1` (as row numbers of its L2 table).
fn top_data_rows(map: &[serde_json::Value], cs: u64, per: u64, l1: u64) -> Vec<usize> {
    map.iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .flat_map(|e| {
            let s = e["start"].as_u64().unwrap() / cs;
            s..s + e["length"].as_u64().unwrap().div_ceil(cs)
        })
        .filter(|c| c / per == l1)
        .map(|c| (c % per) as usize)
        .collect()
}

#[test]
fn find_in_an_l2_table_selects_the_entry_of_a_host_offset_or_a_guest_offset() {
    let map = qemu_map("assets", "demo-top.qcow2");
    let mut a = app("demo-top.qcow2");
    let geo = a.ctx.img.as_ref().unwrap().geometry();
    let (cs, per) = (geo.cluster_size(), geo.l2_entries());
    // The top layer's data that L1 entry 1 maps, as qemu-img map lists it.
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["offset"].as_u64().unwrap()))
        .filter(|(s, _)| s / cs / per == 1)
        .collect();
    assert!(data.len() >= 2, "{map:?}");
    typed(&mut a, "3");
    key(&mut a, KeyCode::Down);
    key(&mut a, KeyCode::Enter);
    assert_eq!(
        a.panes.tables.level,
        crate::tui::panes::tables::Level::L2(1)
    );
    let (start, host) = data[1];
    let row = ((start / cs) % per) as usize;
    // A host offset: the entry that maps to it.
    search(&mut a, &format!("{host:#x}"));
    assert_eq!(a.panes.tables.l2.sel, row, "{host:#x}");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains(&format!("1/1 match for {host:#x}")), "{s}");
    assert!(selected_row(&draw(&mut a, 120, 30), 1).contains(&format!("{host:x}")));
    // A guest offset inside the cluster, in decimal: the same entry.
    key(&mut a, KeyCode::Home);
    search(&mut a, &(start + 4096).to_string());
    assert_eq!(a.panes.tables.l2.sel, row);
    // Words: the entries that map data say so; n and N go round them.
    key(&mut a, KeyCode::Home);
    search(&mut a, "DATA AT HOST");
    let rows = top_data_rows(&map, cs, per, 1);
    let found = a.panes.tables.l2.find.as_ref().unwrap().matches().to_vec();
    assert_eq!(
        found, rows,
        "the clusters qemu-img map says hold this layer's data"
    );
    assert_eq!(a.panes.tables.l2.sel, rows[0]);
    typed(&mut a, "n");
    assert_eq!(a.panes.tables.l2.sel, rows[1]);
    typed(&mut a, "N");
    assert_eq!(a.panes.tables.l2.sel, rows[0]);
    typed(&mut a, "N");
    assert_eq!(a.panes.tables.l2.sel, *rows.last().unwrap(), "N goes round");
    let s = screen(&mut a, 120, 30);
    assert!(
        s.contains(&format!(
            "{}/{} matches for DATA AT HOST",
            rows.len(),
            rows.len()
        )),
        "{s}"
    );
    // Nothing: said, and the selection stays.
    let before = a.panes.tables.l2.sel;
    search(&mut a, "0x7777777");
    assert_eq!(a.panes.tables.l2.sel, before);
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("no match for 0x7777777"), "{s}");
    // Esc forgets the search.
    key(&mut a, KeyCode::Esc);
    assert!(a.panes.tables.l2.find.is_none());
    assert!(!screen(&mut a, 120, 30).contains("no match"));
    // Esc in the prompt cancels it.
    typed(&mut a, "/0x");
    key(&mut a, KeyCode::Esc);
    assert!(a.popup.is_none() && a.panes.tables.l2.find.is_none());
}

#[test]
fn find_in_the_map_walks_every_extent_qemu_img_map_lists_for_a_layer() {
    let map = qemu_map("assets", "demo-top.qcow2");
    let want: Vec<u64> = map
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["start"].as_u64().unwrap())
        .collect();
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "0");
    // Nothing is mapped before the first draw: the search maps as it goes.
    assert!(a.panes.map.extents.is_empty());
    search(&mut a, "data in demo-top.qcow2");
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(a.panes.map.extents[a.panes.map.list.sel].start.get());
        typed(&mut a, "n");
    }
    assert_eq!(got, want);
    assert_eq!(
        a.panes.map.extents[a.panes.map.list.sel].start.get(),
        want[0],
        "n goes round to the first"
    );
    let s = screen(&mut a, 120, 40);
    assert!(
        s.contains(&format!(
            "1/{} matches for data in demo-top.qcow2",
            want.len()
        )),
        "{s}"
    );
}

#[test]
fn find_works_in_check_snapshots_refcounts_and_the_simulation_log() {
    let mut a = app("demo-corrupt.qcow2");
    // Check: the leak qemu-img check names, by its cluster number.
    let out = Command::new("qemu-img")
        .args(["check", "demo-corrupt.qcow2"])
        .current_dir("assets")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let leaked: u64 = said
        .lines()
        .find_map(|l| l.strip_prefix("Leaked cluster "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    typed(&mut a, "7");
    search(&mut a, &leaked.to_string());
    let r = a.ctx.report.clone().unwrap();
    let f = &r.findings[a.panes.check.list.sel];
    assert_eq!(f.cluster, Some(leaked), "{f:?}");
    // Refcounts: the leaked cluster's row in its block, by a host offset in it.
    let cs = a.ctx.cluster_size();
    typed(&mut a, "4");
    key(&mut a, KeyCode::Enter);
    search(&mut a, &format!("{:#x}", leaked * cs + 1));
    assert_eq!(a.panes.refcounts.block.sel as u64, leaked);
    // Snapshots: by name.
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "5");
    search(&mut a, "snap3");
    let img = a.ctx.img.clone().unwrap();
    assert_eq!(
        img.snapshots.snapshots[a.panes.snapshots.list.sel].name,
        "snap3"
    );
    // The simulation log: a word of its changes.
    typed(&mut a, "8");
    a.apply(crate::tui::ctx::Effect::Start(
        crate::tui::ctx::Job::Simulate("write:0:4k".into()),
    ));
    a.wait_background();
    search(&mut a, "refcount");
    let sel = a.panes.simulate.steps.sel;
    let Some(Ok(o)) = &a.panes.simulate.outcome else {
        panic!("simulated")
    };
    let (_, text, _) = &crate::tui::panes::simulate::flat(o)[sel];
    assert!(text.to_lowercase().contains("refcount"), "{text}");
    // Back at the operations there is no list to search: / says so.
    key(&mut a, KeyCode::Backspace);
    typed(&mut a, "/");
    assert!(a.popup.is_none());
    assert!(
        a.status.contains("searches lists") && a.status.contains("run an operation first"),
        "{}",
        a.status
    );
    // Overview has no list and no / at all.
    typed(&mut a, "1/");
    assert!(a.popup.is_none());
}

#[test]
fn a_search_of_a_long_list_goes_on_between_frames_and_keys_still_work() {
    // 2 MiB clusters: L2 tables of 262144 entries.
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "big.qcow2",
            "1T",
        ],
    );
    qemu_io(dir.path(), "big.qcow2", "write -P 1 511G 4k");
    let mut a = open(dir.path().join("big.qcow2"));
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    assert_eq!(
        a.panes.tables.level,
        crate::tui::panes::tables::Level::L2(0)
    );
    typed(&mut a, "/");
    typed(&mut a, "no such words");
    key(&mut a, KeyCode::Enter);
    // Keys work whether or not the search is done; Esc stops it.
    key(&mut a, KeyCode::Down);
    assert_eq!(a.panes.tables.l2.sel, 1);
    draw(&mut a, 100, 30);
    key(&mut a, KeyCode::Esc);
    assert!(!crate::tui::find::running(&a) && a.panes.tables.l2.find.is_none());
    // The entry of the data qemu-io wrote, found by its guest offset.
    search(&mut a, "511G");
    let geo = a.ctx.img.as_ref().unwrap().geometry();
    let row = ((511u64 << 30) / geo.cluster_size() % geo.l2_entries()) as usize;
    assert_eq!(a.panes.tables.l2.sel, row);
    assert_eq!(geo.l2_entries(), 262144);
}

/// What `qemu-img check` says about an image, all of it (the details are on stderr).
fn qemu_check_text(dir: &str, image: &str) -> String {
    let out = Command::new("qemu-img")
        .args(["check", image])
        .current_dir(dir)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Press a key until the selection stops moving; the rows it stopped at.
fn stops(a: &mut App, k: char, sel: impl Fn(&App) -> u64) -> Vec<u64> {
    let mut v = Vec::new();
    for _ in 0..10_000 {
        let before = sel(a);
        typed(a, &k.to_string());
        if sel(a) == before {
            return v;
        }
        v.push(sel(a));
    }
    panic!("{k} never stopped")
}

#[test]
fn next_that_matters_stops_at_each_allocated_entry_mismatch_and_finding() {
    // Tables: } stops at exactly the entries qemu-img map says this layer maps
    // (data or zeros of depth 0), { comes back the same way.
    let map = qemu_map("assets", "demo-top.qcow2");
    let mut a = app("demo-top.qcow2");
    let geo = a.ctx.img.as_ref().unwrap().geometry();
    let (cs, per) = (geo.cluster_size(), geo.l2_entries());
    let mine: Vec<u64> = map
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .flat_map(|e| {
            let s = e["start"].as_u64().unwrap() / cs;
            s..s + e["length"].as_u64().unwrap().div_ceil(cs)
        })
        .filter(|c| c / per == 0)
        .collect();
    assert!(mine.len() >= 2, "{map:?}");
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    let l2sel = |a: &App| a.panes.tables.l2.sel as u64;
    let mut got: Vec<u64> = if mine.first() == Some(&0) {
        vec![0]
    } else {
        vec![]
    };
    got.extend(stops(&mut a, '}', l2sel));
    assert_eq!(got, mine);
    assert!(
        a.status.contains("no allocated L2 entry after"),
        "{}",
        a.status
    );
    let back = stops(&mut a, '{', l2sel);
    let want: Vec<u64> = mine.iter().rev().skip(1).copied().collect();
    assert_eq!(back, want);

    // Refcounts, Check and Layout on the corrupt image, against qemu-img check.
    let said = qemu_check_text("assets", "demo-corrupt.qcow2");
    let mismatched: Vec<u64> = said
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Leaked cluster ")
                .or_else(|| l.strip_prefix("ERROR cluster "))
        })
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert!(!mismatched.is_empty(), "{said}");
    let mut a = app("demo-corrupt.qcow2");
    let cs = a.ctx.cluster_size();
    typed(&mut a, "4");
    key(&mut a, KeyCode::Enter);
    let blocksel = |a: &App| a.panes.refcounts.block.sel as u64;
    assert_eq!(stops(&mut a, '}', blocksel), mismatched, "{said}");
    assert!(a.status.contains("no refcount mismatch"), "{}", a.status);
    // Check: } stops at the corruptions and check errors only; their counts add
    // up to the errors qemu-img check reports.
    let errors: u64 = said
        .lines()
        .find_map(|l| l.strip_suffix(" errors were found on the image."))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    typed(&mut a, "7");
    key(&mut a, KeyCode::Home);
    let r = a.ctx.report.clone().unwrap();
    let bad = |i: u64| {
        matches!(
            r.findings[i as usize].kind,
            qinspect::check::FindingKind::Corruption | qinspect::check::FindingKind::CheckError
        )
    };
    let mut visited: Vec<u64> = if bad(0) { vec![0] } else { vec![] };
    visited.extend(stops(&mut a, '}', |a| a.panes.check.list.sel as u64));
    let counted: u64 = visited.iter().map(|i| r.findings[*i as usize].count).sum();
    assert_eq!(counted, errors, "{:?}", r.findings);
    assert!(visited.iter().all(|i| bad(*i)));
    // Layout: } stops at each cluster qemu-img check names (the leaked cluster
    // and the data clusters whose L2 entries have COPIED wrong).
    let mut named: Vec<u64> = mismatched.clone();
    for l in said.lines() {
        if let Some(e) = l.split("l2_entry=").nth(1) {
            let raw = u64::from_str_radix(e.split(' ').next().unwrap(), 16).unwrap();
            named.push((raw & 0x00ff_ffff_ffff_fe00) / cs);
        }
    }
    named.sort();
    named.dedup();
    typed(&mut a, "2");
    key(&mut a, KeyCode::Home);
    let mut at: Vec<u64> = if named.first() == Some(&0) {
        vec![0]
    } else {
        vec![]
    };
    at.extend(stops(&mut a, '}', |a| a.panes.layout.sel));
    assert_eq!(at, named, "{said}");
    assert!(
        a.status.contains("no cluster with a finding after"),
        "{}",
        a.status
    );
    // The keys are in the help of the panes they work in.
    typed(&mut a, "?");
    let s = screen(&mut a, 120, 60);
    assert!(
        s.contains("}/{") && s.contains("a cluster with a finding"),
        "{s}"
    );
}

#[test]
fn u_hides_unallocated_rows_and_selection_and_search_keep_to_the_rows_shown() {
    let map = qemu_map("assets", "demo-top.qcow2");
    let mut a = app("demo-top.qcow2");
    let geo = a.ctx.img.as_ref().unwrap().geometry();
    let (cs, per) = (geo.cluster_size(), geo.l2_entries());
    // What qemu-img map says layer 0 maps under L1 entry 1.
    let mine: Vec<usize> = map
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .flat_map(|e| {
            let s = e["start"].as_u64().unwrap() / cs;
            s..s + e["length"].as_u64().unwrap().div_ceil(cs)
        })
        .filter(|c| c / per == 1)
        .map(|c| (c % per) as usize)
        .collect();
    assert!(mine.len() >= 2);
    typed(&mut a, "3");
    key(&mut a, KeyCode::Down);
    key(&mut a, KeyCode::Enter);
    typed(&mut a, "u");
    let s = screen(&mut a, 120, 30);
    let hidden = per as usize - mine.len();
    assert!(
        s.contains(&format!("(hiding {hidden} unallocated: u shows them)")),
        "{s}"
    );
    assert!(s.contains(&format!(" 1/{} ", mine.len())), "{s}");
    // The rows on screen are those entries, in order; the arrows go through them.
    assert_eq!(
        a.panes.tables.l2.sel, mine[0],
        "the selection moved to a row shown"
    );
    let mut seen = vec![a.panes.tables.l2.sel];
    for _ in 1..mine.len() {
        key(&mut a, KeyCode::Down);
        seen.push(a.panes.tables.l2.sel);
    }
    assert_eq!(seen, mine);
    key(&mut a, KeyCode::Home);
    assert_eq!(a.panes.tables.l2.sel, mine[0]);
    key(&mut a, KeyCode::End);
    assert_eq!(a.panes.tables.l2.sel, *mine.last().unwrap());
    // A guest offset of a hidden (unallocated) entry finds nothing; the offset of
    // one shown finds it.
    let geo_row = |r: usize| (per + r as u64) * cs;
    let gap = (0..per as usize).find(|r| !mine.contains(r)).unwrap();
    search(&mut a, &geo_row(gap).to_string());
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("no match for"), "{s}");
    search(&mut a, &geo_row(mine[1]).to_string());
    assert_eq!(a.panes.tables.l2.sel, mine[1]);
    // The row drawn selected is that entry.
    let b = draw(&mut a, 120, 30);
    let row = selected_row(&b, 1);
    assert!(row.contains(&format!("{:#x}", geo_row(mine[1]))), "{row}");
    // A jump to a hidden entry (g and its guest offset) lands on it, with every
    // row shown again.
    typed(&mut a, &format!("g{}", geo_row(gap)));
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.panes.tables.l2.sel, gap);
    assert!(a.panes.tables.l2.hidden.is_none());
    assert!(!screen(&mut a, 120, 30).contains("hiding"));
    // Backspace returns to the place before the jump, rows hidden as they were.
    key(&mut a, KeyCode::Backspace);
    assert!(a.panes.tables.l2.hidden.is_some());
    assert_eq!(a.panes.tables.l2.sel, mine[1]);
    // u again: every row, the selection where it was.
    typed(&mut a, "u");
    let s = screen(&mut a, 120, 30);
    assert!(!s.contains("hiding"), "{s}");
    assert_eq!(a.panes.tables.l2.sel, mine[1]);
    assert!(s.contains(&format!(" {}/{per} ", mine[1] + 1)), "{s}");

    // Map: the extents that are allocated nowhere go.
    let unallocated = map.iter().filter(|e| e["present"] == false).count();
    typed(&mut a, "0");
    draw(&mut a, 120, 40);
    key(&mut a, KeyCode::End);
    draw(&mut a, 120, 40);
    typed(&mut a, "u");
    key(&mut a, KeyCode::Home);
    let b = draw(&mut a, 120, 40);
    let s = text(&b);
    assert!(
        s.contains(&format!("(hiding {unallocated} unallocated: u shows them)")),
        "{s}"
    );
    assert!(!s.contains("unallocated in every layer"), "{s}");

    // Refcounts: the clusters with refcount 0 go.
    typed(&mut a, "4");
    key(&mut a, KeyCode::Enter);
    typed(&mut a, "u");
    let s = screen(&mut a, 120, 40);
    let img = a.ctx.img.clone().unwrap();
    let per = img.refcount_geometry().entries_per_block();
    let used = (0..per)
        .filter(|c| a.ctx.stored_refcount(*c).unwrap_or(0) > 0)
        .count() as u64;
    assert!(
        s.contains(&format!(
            "(hiding {} with refcount 0: u shows them)",
            per - used
        )),
        "{s}"
    );
    assert!(!s.contains("stored 0 "), "{s}");
}

#[test]
fn find_in_the_changes_after_qemu_img_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    qemu_io(dir.path(), "a.qcow2", "write -P 7 0 192k");
    let mut a = open(dir.path().join("a.qcow2"));
    qemu_img(dir.path(), &["snapshot", "-c", "x", "a.qcow2"]);
    typed(&mut a, "r");
    a.wait_background();
    let changes = a.changes.clone().expect("compared");
    // Opened from a pane that has no list of its own: / works in the popup.
    typed(&mut a, "1c");
    search(&mut a, "1→2");
    let Some(Popup::Changes(v)) = &a.popup else {
        panic!("the Changes list stays open: {:?}", a.popup.is_some())
    };
    let want: Vec<usize> = (0..changes.len())
        .filter(|i| changes[*i].text.contains("1→2"))
        .collect();
    assert!(want.len() >= 4, "{changes:?}");
    assert_eq!(v.find.as_ref().unwrap().matches(), &want[..]);
    assert_eq!(v.sel, want[0]);
    typed(&mut a, "n");
    let sel = |a: &App| match &a.popup {
        Some(Popup::Changes(v)) => v.sel,
        _ => usize::MAX,
    };
    assert_eq!(sel(&a), want[1]);
    let s = screen(&mut a, 120, 40);
    assert!(
        s.contains(&format!("2/{} matches for 1→2", want.len())),
        "{s}"
    );
    // A cluster number: the row of that cluster; Enter opens its refcount.
    let l2 = changes
        .iter()
        .find(|c| c.text.contains("(l2-table)"))
        .and_then(|c| c.cluster)
        .unwrap();
    search(&mut a, &l2.to_string());
    assert_eq!(changes[sel(&a)].cluster, Some(l2));
    // Esc forgets the search, a second Esc closes the list.
    key(&mut a, KeyCode::Esc);
    assert!(matches!(&a.popup, Some(Popup::Changes(v)) if v.find.is_none()));
    key(&mut a, KeyCode::Enter);
    assert_eq!(
        (a.pane, a.panes.refcounts.block.sel as u64),
        (Pane::Refcounts, l2)
    );
}
