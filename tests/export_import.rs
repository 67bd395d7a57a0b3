//! `diff`, `export`, `import` and `optimise` end to end: a lower built by
//! real Nix, builds on top of it through the merged store, exports read by
//! stock `nix-store --import` in fresh stores, and faults in the files.
//! Every test runs in its own mount namespace with a tmpfs on /nix.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{base_name, sh, stderr, upper_entries, valid_count, verify_contents, Stack, World};
use nixfs_layer::export;

fn stack() -> Stack {
    Stack::new(&["app", "tool"])
}

fn all_valid(w: &World) -> BTreeSet<String> {
    w.nix_ok("nix", ["path-info", "--all"])
        .lines()
        .map(str::to_owned)
        .collect()
}

impl Stack {
    /// Builds `attr` through the merged store with a `result` link as GC root.
    fn build_rooted(&self, attr: &str) -> String {
        let link = self.w.path(&format!("result-{attr}"));
        self.w
            .nix_ok(
                "nix-build",
                [
                    "-o",
                    link.to_str().unwrap(),
                    &common::fixture("store.nix"),
                    "-A",
                    attr,
                ],
            )
            .trim()
            .to_owned()
    }
}

/// The paths an export file holds, read by this crate's reader.
fn exported(file: &Path) -> export::Contents {
    export::Input::open(file).unwrap().read(None).unwrap()
}

fn paths_of(c: &export::Contents) -> BTreeSet<String> {
    c.entries.iter().map(|e| e.path.to_absolute()).collect()
}

/// `nix-store --import` of `file` (decompressed by `decompress`, if any).
fn nix_import(w: &World, file: &Path, decompress: Option<&str>) -> Vec<String> {
    // The decompressor runs on the host (the modern-Nix chroot has no
    // zstd or xz), piping into the Nix under test.
    let script = match decompress {
        Some(d) => format!("{d} -dc {} | nix-store --import", file.display()),
        None => format!("nix-store --import < {}", file.display()),
    };
    let input: Stdio = match decompress {
        Some(d) => Command::new(d)
            .arg("-dc")
            .arg(file)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
            .stdout
            .take()
            .unwrap()
            .into(),
        None => std::fs::File::open(file).unwrap().into(),
    };
    let out = w
        .nix("nix-store")
        .arg("--import")
        .stdin(input)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

ns_test! {
    fn diff_names_upper_only_paths_and_their_roots() {
        let s = stack();
        s.mount();
        let on_top = s.build_rooted("onTop");
        let on_top_drv = s.w.nix_ok("nix-store", ["-q", "--deriver", &on_top]).trim().to_owned();
        let size = |p: &str| -> u64 { s.w.nix_ok("nix-store", ["-q", "--size", p]).trim().parse().unwrap() };

        let out = s.w.tool_ok(["diff", "--json"]);
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(doc["format"], 1);
        let listed: Vec<(String, u64)> = doc["paths"].as_array().unwrap().iter()
            .map(|p| (p["path"].as_str().unwrap().to_owned(), p["nar_size"].as_u64().unwrap()))
            .collect();
        let mut expected = vec![(on_top.clone(), size(&on_top)), (on_top_drv.clone(), size(&on_top_drv))];
        expected.sort();
        assert_eq!(listed, expected, "{doc}");
        assert_eq!(doc["total_paths"], 2);
        assert_eq!(doc["total_bytes"], size(&on_top) + size(&on_top_drv));
        assert_eq!(doc["unrooted_paths"], 1, "the .drv has no root: {doc}");
        let root = doc["roots"].as_array().unwrap().iter()
            .find(|r| r["path"] == on_top.as_str())
            .unwrap_or_else(|| panic!("the result link roots on-top: {doc}"));
        assert!(root["root"].as_str().unwrap().starts_with("/nix/var/nix/gcroots/"), "{root}");
        assert_eq!(root["indirect"], s.w.path("result-onTop").to_str().unwrap());
        assert_eq!(root["upper_only"], serde_json::json!([on_top]));
        let by_path = |p: &str| doc["paths"].as_array().unwrap().iter().find(|x| x["path"] == p).unwrap().clone();
        assert_eq!(by_path(&on_top)["roots"], serde_json::json!([root["root"]]));
        assert_eq!(by_path(&on_top_drv)["roots"], serde_json::json!([]));
        assert!(listed.iter().all(|(p, _)| !s.lower_paths.contains(p)), "no lower path is upper-only: {doc}");

        let text = s.w.tool_ok(["diff"]);
        assert!(text.starts_with(&format!("upper-only: 2 path(s), {} bytes, 1 unrooted\n", size(&on_top) + size(&on_top_drv))), "{text}");
        assert!(text.contains(&format!("{on_top}\t{}\t/nix/var/nix/gcroots/", size(&on_top))), "{text}");
        assert!(text.contains(&format!("{on_top_drv}\t{}\t-\n", size(&on_top_drv))), "{text}");
    }
}

ns_test! {
    fn export_reads_into_stock_nix_byte_for_byte_and_leaves_out_the_lowers_paths() {
        let s = stack();
        s.mount();
        let on_top = s.build_rooted("onTop");
        let file = s.w.path("upper.export");
        let out = s.w.tool_ok(["export", "-o", file.to_str().unwrap()]);
        assert!(out.starts_with("exported 1 path(s), "), "{out}");
        let c = exported(&file);
        assert!(c.checksummed);
        assert_eq!(paths_of(&c), BTreeSet::from([on_top.clone()]), "only the upper-only closure");
        assert!(paths_of(&c).is_disjoint(&s.lower_paths));

        // Up to the end marker, the file is what Nix 2.8 exports.
        let nix = s.w.nix("nix-store").args(["--export", &on_top]).output().unwrap();
        assert!(nix.status.success(), "{}", stderr(&nix));
        let ours = std::fs::read(&file).unwrap();
        assert!(ours.len() > nix.stdout.len());
        assert_eq!(&ours[..nix.stdout.len()], &nix.stdout[..], "byte for byte");

        // Several paths: the same order as Nix's.
        let app = s.lower_paths.iter().find(|p| p.ends_with("-app")).unwrap().clone();
        let multi = s.w.path("multi.export");
        s.w.tool_ok(["export", "--full", "-o", multi.to_str().unwrap(), &on_top]);
        let closure: Vec<String> = s.w.nix_ok("nix-store", ["-qR", &on_top]).lines().map(str::to_owned).collect();
        let mut args = vec!["--export".to_owned()];
        args.extend(closure.iter().cloned());
        let nix = s.w.nix("nix-store").args(&args).output().unwrap();
        let ours = std::fs::read(&multi).unwrap();
        assert_eq!(&ours[..nix.stdout.len()], &nix.stdout[..], "byte for byte, {} paths", closure.len());
        assert!(paths_of(&exported(&multi)).contains(&app));

        // A machine with the lower's paths (built the same way) takes it.
        let fresh = s.w.path("fresh");
        s.w.with_nix_at(&fresh, || {
            s.w.build(&["app", "tool"]);
            assert!(!s.valid(&on_top));
            let imported = nix_import(&s.w, &file, None);
            assert_eq!(imported, vec![on_top.clone()]);
            assert!(s.valid(&on_top));
            assert_eq!(sh(&format!("{on_top}/bin/on-top")), "hello from on-top\n");
            verify_contents(&s.w);
        });
        // The merged store's view of the references, for comparison.
        let refs_here = s.w.nix_ok("nix-store", ["-q", "--references", &on_top]);
        let refs_there = s.w.with_nix_at(&fresh, || s.w.nix_ok("nix-store", ["-q", "--references", &on_top]));
        assert_eq!(refs_here, refs_there);
    }
}

ns_test! {
    fn a_full_export_imports_into_an_empty_store() {
        let s = stack();
        s.mount();
        let on_top = s.build_rooted("onTop");
        let closure: BTreeSet<String> = s.w.nix_ok("nix-store", ["-qR", &on_top]).lines().map(str::to_owned).collect();
        for (compress, program) in [("xz", "xz"), ("zstd", "zstd")] {
            let file = s.w.path(&format!("full.{compress}"));
            let out = s.w.tool_ok(["export", "--full", "--compress", compress, "-o", file.to_str().unwrap()]);
            assert!(out.starts_with(&format!("exported {} path(s)", closure.len())), "{out}");
            let head = std::fs::read(&file).unwrap();
            assert_eq!(export::Compression::detect(&head), if compress == "xz" { export::Compression::Xz } else { export::Compression::Zstd });
            assert_eq!(paths_of(&exported(&file)), closure, "the whole closure, nothing else");
            let empty = s.w.path(&format!("empty-{compress}"));
            s.w.with_nix_at(&empty, || {
                assert!(all_valid(&s.w).is_empty());
                let imported: BTreeSet<String> = nix_import(&s.w, &file, Some(program)).into_iter().collect();
                assert_eq!(imported, closure);
                assert_eq!(all_valid(&s.w), closure);
                assert_eq!(sh(&format!("{on_top}/bin/on-top")), "hello from on-top\n");
                verify_contents(&s.w);
            });
        }
    }
}

ns_test! {
    fn import_takes_exports_into_another_upper_and_refuses_damaged_files_whole() {
        let s = stack();
        s.mount();
        let on_top = s.build_rooted("onTop");
        let extra = s.build_rooted("extra");
        let plain = s.w.path("upper.export");
        let zst = s.w.path("upper.export.zst");
        s.w.tool_ok(["export", "-o", plain.to_str().unwrap(), &on_top]);
        s.w.tool_ok(["export", "--compress", "zstd", "-o", zst.to_str().unwrap(), &on_top]);
        let nix_plain = s.w.path("extra.nix-export");
        let out = s.w.nix("sh").args(["-c", &format!("nix-store --export {extra} > {}", nix_plain.display())]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        s.w.tool_ok(["umount"]);

        // Another machine: the same lower, an upper of its own.
        let upper2 = s.w.path("upper2");
        s.w.tool_ok(["init", "--upper", upper2.to_str().unwrap()]);
        s.mount_upper(&upper2);
        assert!(!s.valid(&on_top));
        let rows = valid_count(&upper2);
        let entries_before = upper_entries(&upper2);

        let bytes = std::fs::read(&plain).unwrap();
        let damaged = |name: &str, data: &[u8]| -> PathBuf {
            let p = s.w.path(name);
            std::fs::write(&p, data).unwrap();
            p
        };
        let at = bytes.windows(17).position(|w| w == b"hello from on-top").unwrap();
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x04;
        let zbytes = std::fs::read(&zst).unwrap();
        let cases = [
            (damaged("truncated", &bytes[..at + 3]), "truncated"),
            (damaged("flipped", &flipped), "corrupt: the NAR of"),
            (damaged("truncated.zst", &zbytes[..zbytes.len() - 9]), "`zstd` failed"),
        ];
        for (file, says) in &cases {
            let out = s.w.tool(["import", file.to_str().unwrap()]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(65), "{}: {err}", file.display());
            assert_eq!(err.lines().count(), 1, "one line: {err}");
            assert!(err.starts_with(&format!("nixfs-layer: {}: ", file.display())), "names the file: {err}");
            assert!(err.contains(says), "{says}: {err}");
            assert!(!s.valid(&on_top), "nothing registered after {}", file.display());
            assert_eq!(valid_count(&upper2), rows, "no row added by {}", file.display());
            assert_eq!(upper_entries(&upper2), entries_before, "nothing unpacked by {}", file.display());
        }
        assert!(stderr(&s.w.tool(["import", cases[1].0.to_str().unwrap()])).contains(&on_top), "the flip names the path");

        let out = s.w.tool_ok(["import", zst.to_str().unwrap()]);
        assert_eq!(out, format!("imported 1 path(s), 0 already present\n{on_top}\n"));
        assert!(s.valid(&on_top));
        assert!(upper_entries(&upper2).contains(&base_name(&on_top).to_owned()), "landed in the upper");
        assert_eq!(sh(&format!("{on_top}/bin/on-top")), "hello from on-top\n");
        let out = s.w.tool_ok(["import", plain.to_str().unwrap()]);
        assert_eq!(out, "imported 0 path(s), 1 already present\n");

        // A plain nix-store --export file: checked structurally, imported.
        let out = s.w.tool_ok(["import", nix_plain.to_str().unwrap()]);
        assert!(out.starts_with("imported 1 path(s), 0 already present (no checksum trailer"), "{out}");
        assert!(s.valid(&extra));
        verify_contents(&s.w);
        let out = s.w.tool(["verify", "--check-contents"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let diff: serde_json::Value = serde_json::from_str(&s.w.tool_ok(["diff", "--json"])).unwrap();
        assert_eq!(diff["total_paths"], 2, "on-top and extra are upper-only here: {diff}");
    }
}

ns_test! {
    fn import_refuses_a_file_whose_references_this_store_lacks() {
        let s = stack();
        s.mount();
        let on_top = s.build_rooted("onTop");
        let file = s.w.path("upper.export");
        s.w.tool_ok(["export", "-o", file.to_str().unwrap(), &on_top]);
        s.w.tool_ok(["umount"]);
        // A stack whose lower lacks app and tool.
        let other = s.w.path("other-lower");
        s.w.with_nix_at(&other, || s.w.build(&["liba"]));
        let upper2 = s.w.path("upper2");
        s.w.tool_ok(["init", "--upper", upper2.to_str().unwrap()]);
        s.w.tool_ok(["mount", "--lower", other.to_str().unwrap(), "--upper", upper2.to_str().unwrap(), "--no-flake-fs"]);
        let rows = valid_count(&upper2);
        let out = s.w.tool(["import", file.to_str().unwrap()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(65), "{err}");
        assert!(err.contains(&format!("{on_top} refers to")) && err.contains("--full"), "{err}");
        assert_eq!(valid_count(&upper2), rows);
        assert!(!s.valid(&on_top));
    }
}

/// Sum of the file sizes under `p`.
fn apparent(p: &Path) -> u64 {
    walkdir::WalkDir::new(p)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_type().is_dir())
        .map(|e| e.path().symlink_metadata().unwrap().len())
        .sum()
}

ns_test! {
    fn optimise_drops_upper_copies_a_lower_gained() {
        let s = stack();
        s.mount();
        let extra = s.build_rooted("extra");
        let extra_drv = s.w.nix_ok("nix-store", ["-q", "--deriver", &extra]).trim().to_owned();
        let on_top = s.build_rooted("onTop");
        // Nothing to do yet.
        let out = s.w.tool_ok(["optimise"]);
        assert_eq!(out, "dropped 0 upper cop(y/ies), freed 0 bytes\n");

        // The lower gains extra (and its .drv) by building it itself.
        let built = s.w.with_nix_at(&s.lower, || s.w.build(&["extra"]));
        assert_eq!(built, vec![extra.clone()]);
        s.w.tool_ok(["sync"]);
        let doubled: Vec<String> = [&extra, &extra_drv].iter().map(|p| p.to_string()).collect();
        let bytes: u64 = doubled.iter().map(|p| apparent(&s.upper.join("store").join(base_name(p)))).sum();
        assert!(bytes > 0);
        let diff: serde_json::Value = serde_json::from_str(&s.w.tool_ok(["diff", "--json"])).unwrap();
        assert!(diff["paths"].as_array().unwrap().iter().all(|p| p["path"] != extra.as_str()), "a lower has extra now: {diff}");

        let out = s.w.tool_ok(["optimise", "--json"]);
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut dropped: Vec<String> = doc["dropped"].as_array().unwrap().iter().map(|d| d["path"].as_str().unwrap().to_owned()).collect();
        dropped.sort();
        let mut want = doubled.clone();
        want.sort();
        assert_eq!(dropped, want, "{doc}");
        assert_eq!(doc["bytes_freed"], bytes, "{doc}");
        assert_eq!(doc["kept"], serde_json::json!([]));
        assert_eq!(doc["remounted"], true);
        for p in &doubled {
            assert!(!s.upper.join("store").join(base_name(p)).exists(), "upper copy of {p} gone");
            let layer: i64 = rusqlite::Connection::open(s.upper.join("var/nix/db/db.sqlite")).unwrap()
                .query_row("select layer from NixfsLayerOrigin where path = ?1", [p], |r| r.get(0)).unwrap();
            assert!(layer > 0, "{p} is lower-provided now");
        }
        assert!(s.upper.join("store").join(base_name(&on_top)).exists(), "on-top stays");
        assert_eq!(sh(&format!("{extra}/bin/extra")), "hello from extra\n", "served from the lower, no stale handle");
        verify_contents(&s.w);
        let v = s.w.tool(["verify", "--check-contents"]);
        assert_eq!(v.status.code(), Some(0), "{}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
        let out = s.w.tool_ok(["optimise"]);
        assert_eq!(out, "dropped 0 upper cop(y/ies), freed 0 bytes\n", "nothing left to drop");

        // Without its root, Nix's collector must still leave extra alone:
        // it is the lower's now (deleting it would white out the lower's copy).
        std::fs::remove_file(s.w.path("result-extra")).unwrap();
        s.w.nix_ok("nix-store", ["--gc"]);
        assert!(s.valid(&extra) && Path::new(&extra).exists(), "lower-provided extra survives gc");
        assert!(s.whiteouts().is_empty(), "{:?}", s.whiteouts());
        verify_contents(&s.w);
    }
}
