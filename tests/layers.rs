//! The module layers point down only: api -> sandbox -> vmm -> devices, with
//! config, the guest seam (`guest`), logging (`obs`) and the seccomp
//! filters (`seccomp`) neutral: every layer may use them and they use no
//! layer. Read from the source itself: every
//! `crate::<module>` path outside comments is an arrow.

use std::path::{Path, PathBuf};

/// Rank of a top-level module; `None` for the neutral ones.
fn rank(module: &str) -> Option<Option<u8>> {
    match module {
        "devices" => Some(Some(0)),
        "vmm" => Some(Some(1)),
        "sandbox" => Some(Some(2)),
        "api" => Some(Some(3)),
        "config" | "guest" | "obs" | "seccomp" => Some(None),
        _ => None,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `crate::<name>` in code (not comments) of `text`.
fn arrows(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            found.push((n + 1, name));
            rest = after;
        }
    }
    found
}

#[test]
fn no_module_imports_a_module_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        // main.rs, lib.rs and bin/ wire the layers together.
        let Some(from) = rank(&top) else { continue };
        let text = std::fs::read_to_string(f).unwrap();
        for (line, to_name) in arrows(&text) {
            let Some(to) = rank(&to_name) else {
                wrong.push(format!("{}:{line}: crate::{to_name} is not a known module", rel.display()));
                continue;
            };
            checked += 1;
            let ok = match (from, to) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(a), Some(b)) => b <= a,
            };
            if !ok {
                wrong.push(format!("{}:{line}: {top} uses crate::{to_name}, a layer above it", rel.display()));
            }
        }
    }
    assert!(checked > 20, "found only {checked} crate:: paths: the scan is broken");
    assert!(wrong.is_empty(), "arrows pointing up:\n{}", wrong.join("\n"));
}

#[test]
fn the_scan_sees_an_upward_arrow() {
    let found = arrows("use crate::api::Foo; // crate::sandbox in a comment\n/// crate::vmm in a doc\nlet x = crate::sandbox::y;");
    let names: Vec<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["api", "sandbox"]);
}
