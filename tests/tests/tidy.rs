//! Tidy: invariants of the source tree, checked by reading the sources, in the style of
//! rust-analyzer's `xtask/src/tidy.rs`: plain Rust over the files, no process, no network, well
//! under a second.
//!
//! 1. `sans_io_modules_do_no_io`: the protocol cores (secure aggregation, privacy accounting, the
//!    plan state machine, the strategies, the engine) import no async runtime or RPC stack and
//!    touch no file, socket, process, sleep or clock, outside test code.
//! 2. `node_and_coordinator_never_depend_on_each_other`: neither crate names the other in its
//!    `Cargo.toml` or its sources; `protocol` names neither.
//! 3. `source_files_stay_under_600_lines_or_say_why`: non-test code of a file stays under 600
//!    lines unless its `//!` header has a `//! Length:` line giving the reason.
//! 4. `string_errors_only_go_down`: `Result<_, String>` in library code is a ratchet: the count per
//!    file may only fall, and the table below must follow it down.
//! 5. `anyhow_only_in_main_and_cli_modules`: library code returns typed errors; `anyhow` is named
//!    only in `main.rs` and the CLI modules (`cli.rs`, `cli_*.rs`, `*_cli.rs`), outside test code.
//!
//! Each rule is a pure function of a file's path and text; the tests at the end feed each one a
//! small source that breaks it (so the rule can fail) and one that does not.
//!
//! "Test code" is what `cfg(test)` compiles in: an item behind a column-0 `#[cfg(test)]` (an
//! inline `mod tests { … }` up to its closing `}` at column 0), a file declared by
//! `#[cfg(test)] mod name;`, and files named `tests.rs`. An indented `#[cfg(test)]` on a method
//! stays checked: it is rare and small, and a false alarm there is cheap.

#![allow(clippy::unwrap_used, clippy::panic)] // a file that cannot be read is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Tables. Every row is checked against the tree: a row that no longer matches anything fails, so
// the tables stay exact.
// ---------------------------------------------------------------------------------------------

/// The sans-IO modules: (path or directory prefix ending in `/`). A directory that does not exist
/// yet is skipped; once it exists it is checked.
const SANS_IO: &[&str] = &[
    "protocol/src/secagg/",
    "protocol/src/privacy/",
    "coordinator/src/round.rs",
    "coordinator/src/aggregate.rs",
    "coordinator/src/engine/",
];

/// Files or (file, item) pairs inside the sans-IO paths that are not held to the rule, for good:
/// (file, item or "*" for the whole file, why).
const SANS_IO_EXCEPTIONS: &[(&str, &str, &str)] = &[
    (
        "protocol/src/privacy/cli.rs",
        "*",
        "the `privacy epsilon|noise` subcommands both binaries mount (clap, printing): a CLI module, not accounting",
    ),
    (
        "protocol/src/secagg/sim.rs",
        "Instant::now",
        "the in-process round simulator of the property tests and the benchmark times masking and unmasking \
         (`Timings`) on the wall clock; the state machines it drives take `now` as an argument",
    ),
];

/// Sans-IO violations that exist today and are to be removed: (file, item, why with a TODO naming
/// issue 12). Empty: none
/// of the sans-IO modules breaks the rule outside the exceptions above.
const SANS_IO_ALLOWED_TODAY: &[(&str, &str, &str)] = &[];

/// The limit on a file's non-test lines (issue 12: "no file over about 600 lines without a reason
/// written at its top").
const MAX_LINES: usize = 600;

/// Files over [`MAX_LINES`] today that are to be split: (file, or a directory being split, ending in
/// `/`; why with a TODO naming issue 12). Each row must still be over the limit without a
/// `//! Length:` line, or it fails as stale. (node/src/daemon/ came under the limit while this
/// test was written: it is checked like any other file.) Empty since issue 12: every file over
/// the limit says why at its top.
const LENGTH_ALLOWED_TODAY: &[(&str, &str)] = &[];

/// `Result<_, String>` in library code today, per file (or per directory being split, ending in
/// `/`, whose files are counted together): the ratchet. A file's count may only go
/// down, and when it does its row must be lowered (or removed at zero). Empty since issue 12: none
/// is allowed.
const STRING_ERRORS_TODAY: &[(&str, usize)] = &[];

// ---------------------------------------------------------------------------------------------
// The five tests over the real tree.
// ---------------------------------------------------------------------------------------------

#[test]
fn sans_io_modules_do_no_io() {
    let mut failures = Vec::new();
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    for source in Tree::load().sources() {
        if !is_sans_io(&source.path) || source.test_only {
            continue;
        }
        if SANS_IO_EXCEPTIONS.iter().any(|(file, item, _)| *file == source.path && *item == "*") {
            continue;
        }
        for finding in sans_io_findings(&source.text) {
            let excused = SANS_IO_EXCEPTIONS
                .iter()
                .map(|(f, i, _)| (f, i))
                .chain(SANS_IO_ALLOWED_TODAY.iter().map(|(f, i, _)| (f, i)))
                .any(|(f, i)| *f == source.path && *i == finding.item);
            if excused {
                used.insert((source.path.clone(), finding.item.to_string()));
                continue;
            }
            failures.push(Failure::new(&source.path, finding.line, "sans-io", finding.message()));
        }
    }
    let root = workspace_root();
    for (file, item, _) in SANS_IO_EXCEPTIONS.iter().chain(SANS_IO_ALLOWED_TODAY) {
        let stale = if *item == "*" {
            !root.join(file).is_file()
        } else {
            !used.contains(&(file.to_string(), item.to_string()))
        };
        if stale {
            failures.push(Failure::new(
                file,
                0,
                "sans-io",
                format!("the sans-IO table excuses `{item}` here but the file no longer has it: remove the row from tests/tests/tidy.rs"),
            ));
        }
    }
    report(failures);
}

#[test]
fn node_and_coordinator_never_depend_on_each_other() {
    let tree = Tree::load();
    let mut failures = Vec::new();
    // (crate directory, the packages it must not depend on)
    let rules: &[(&str, &[&str])] = &[
        ("node", &["sanctum-coordinator"]),
        ("coordinator", &["sanctum-node"]),
        ("protocol", &["sanctum-node", "sanctum-coordinator"]),
    ];
    for (dir, forbidden) in rules {
        let manifest = format!("{dir}/Cargo.toml");
        let text = read(&workspace_root().join(&manifest));
        failures.extend(dependency_failures(&manifest, &text, forbidden));
        for source in tree.sources().filter(|s| s.path.starts_with(&format!("{dir}/src/"))) {
            failures.extend(import_failures(&source.path, &source.text, forbidden));
        }
    }
    report(failures);
}

#[test]
fn source_files_stay_under_600_lines_or_say_why() {
    let mut failures = Vec::new();
    let mut over: BTreeMap<String, usize> = BTreeMap::new();
    for source in Tree::load().sources() {
        if !["protocol/src/", "coordinator/src/", "node/src/", "tests/src/"].iter().any(|d| source.path.starts_with(d))
        {
            continue;
        }
        let Some(failure) = length_failure(&source.path, &source.text, source.test_only) else { continue };
        over.insert(source.path.clone(), counted_lines(&source.text));
        if row_of(LENGTH_ALLOWED_TODAY.iter().map(|(f, _)| *f), &source.path).is_none() {
            failures.push(failure);
        }
    }
    for (file, _) in LENGTH_ALLOWED_TODAY {
        if !over.keys().any(|o| row_of([*file], o).is_some()) {
            failures.push(Failure::new(
                file,
                0,
                "length",
                format!("no longer over {MAX_LINES} lines without a reason: remove it from LENGTH_ALLOWED_TODAY in tests/tests/tidy.rs"),
            ));
        }
    }
    for (file, n) in &over {
        println!("over {MAX_LINES} lines, allowed for now: {file} ({n})");
    }
    report(failures);
}

#[test]
fn string_errors_only_go_down() {
    let mut failures = Vec::new();
    let table: BTreeMap<&str, usize> = STRING_ERRORS_TODAY.iter().copied().collect();
    // By table row (a file, or a directory being split whose files are counted together): the
    // (file, line) of each occurrence.
    let mut seen: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    for source in Tree::load().sources() {
        if !["protocol/src/", "coordinator/src/", "node/src/"].iter().any(|d| source.path.starts_with(d))
            || source.test_only
            || is_binary_or_cli(&source.path)
        {
            continue;
        }
        let row = row_of(table.keys().copied(), &source.path).unwrap_or(&source.path).to_string();
        for line in string_error_lines(&source.text) {
            seen.entry(row.clone()).or_default().push((source.path.clone(), line));
        }
    }
    for (row, places) in &seen {
        let allowed = table.get(row.as_str()).copied().unwrap_or(0);
        let list = places.iter().map(|(f, l)| format!("{f}:{l}")).collect::<Vec<_>>().join(", ");
        if places.len() > allowed {
            let (file, line) = &places[allowed];
            failures.push(Failure::new(
                file,
                *line,
                "string-errors",
                format!(
                    "{} `Result<_, String>` in library code under the row {row} ({list}), the table allows {allowed}: \
                     return this area's thiserror enum instead (anyhow and strings only in main.rs and the CLI modules)",
                    places.len(),
                ),
            ));
        } else if places.len() < allowed {
            failures.push(Failure::new(
                row,
                0,
                "string-errors",
                format!(
                    "the count went down in {row}: lower it in the table (STRING_ERRORS_TODAY in tests/tests/tidy.rs: {allowed} → {}; now {list})",
                    places.len()
                ),
            ));
        }
    }
    for (row, allowed) in &table {
        if !seen.contains_key(*row) {
            failures.push(Failure::new(
                row,
                0,
                "string-errors",
                format!("the count went down in {row}: lower it in the table (STRING_ERRORS_TODAY in tests/tests/tidy.rs: {allowed} → 0, remove the row)"),
            ));
        }
    }
    let total: usize = seen.values().map(Vec::len).sum();
    println!("`Result<_, String>` in library code: {total} in {} files", seen.len());
    for (file, lines) in &seen {
        println!("    (\"{file}\", {}),", lines.len());
    }
    report(failures);
}

// ---------------------------------------------------------------------------------------------
// Failures.
// ---------------------------------------------------------------------------------------------

/// One broken rule at one place: `file:line: [rule] what and the fix`. Line 0 means the file as a
/// whole (or a table row of this file).
#[derive(Debug, PartialEq, Eq)]
struct Failure {
    file: String,
    line: usize,
    rule: &'static str,
    message: String,
}

impl Failure {
    fn new(file: &str, line: usize, rule: &'static str, message: String) -> Failure {
        Failure { file: file.to_string(), line, rule, message }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: [{}] {}", self.file, self.line, self.rule, self.message)
    }
}

/// Fails once with every failure, so one run shows all of them.
fn report(failures: Vec<Failure>) {
    if !failures.is_empty() {
        let list: Vec<String> = failures.iter().map(ToString::to_string).collect();
        panic!("\ntidy: {} failure(s)\n{}\n", failures.len(), list.join("\n"));
    }
}

/// The row of a table that covers `path`: the row equal to it, or a directory row (ending in `/`)
/// above it.
fn row_of<'a>(rows: impl IntoIterator<Item = &'a str>, path: &str) -> Option<&'a str> {
    rows.into_iter().find(|row| *row == path || (row.ends_with('/') && path.starts_with(row)))
}

// ---------------------------------------------------------------------------------------------
// The tree.
// ---------------------------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Source {
    /// Relative to the workspace root, with `/`.
    path: String,
    text: String,
    /// Compiled only under `cfg(test)`: named `tests.rs`, or declared by `#[cfg(test)] mod name;`
    /// (and everything under it).
    test_only: bool,
}

struct Tree {
    sources: Vec<Source>,
}

impl Tree {
    fn load() -> Tree {
        let root = workspace_root();
        let mut paths = Vec::new();
        for dir in ["protocol/src", "coordinator/src", "node/src", "tests/src"] {
            walk(&root.join(dir), &mut paths);
        }
        paths.sort();
        let mut sources: Vec<Source> = paths
            .iter()
            .map(|p| {
                let rel = p.strip_prefix(&root).unwrap_or(p).to_string_lossy().replace('\\', "/");
                Source { test_only: rel.ends_with("/tests.rs"), text: read(p), path: rel }
            })
            .collect();
        let test_prefixes: Vec<String> = sources.iter().flat_map(|s| test_module_paths(&s.path, &s.text)).collect();
        for source in &mut sources {
            if test_prefixes
                .iter()
                .any(|p| source.path == format!("{p}.rs") || source.path.starts_with(&format!("{p}/")))
            {
                source.test_only = true;
            }
        }
        Tree { sources }
    }

    fn sources(&self) -> impl Iterator<Item = &Source> {
        self.sources.iter()
    }
}

/// Every `.rs` file under `dir`; a directory that does not exist adds nothing.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module paths (without `.rs`) that `path` declares behind `#[cfg(test)] mod name;`.
fn test_module_paths(path: &str, text: &str) -> Vec<String> {
    let Some((dir, file)) = path.rsplit_once('/') else { return Vec::new() };
    let base = match file {
        "lib.rs" | "main.rs" | "mod.rs" => dir.to_string(),
        other => format!("{dir}/{}", other.trim_end_matches(".rs")),
    };
    test_regions(text).1.into_iter().map(|name| format!("{base}/{name}")).collect()
}

fn is_sans_io(path: &str) -> bool {
    SANS_IO.iter().any(|p| if p.ends_with('/') { path.starts_with(p) } else { path == *p })
}

/// `main.rs` and the CLI modules (`cli.rs`, `cli_*.rs`, `*_cli.rs`): the edges, where anyhow and
/// string errors are fine.
fn is_binary_or_cli(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == "main.rs" || name == "cli.rs" || name.starts_with("cli_") || name.ends_with("_cli.rs")
}

#[test]
fn anyhow_only_in_main_and_cli_modules() {
    let mut failures = Vec::new();
    for source in Tree::load().sources() {
        if !["protocol/src/", "coordinator/src/", "node/src/"].iter().any(|d| source.path.starts_with(d))
            || source.test_only
            || is_binary_or_cli(&source.path)
        {
            continue;
        }
        for line in anyhow_lines(&source.text) {
            failures.push(Failure::new(
                &source.path,
                line,
                "anyhow",
                "anyhow in library code: return this area's thiserror enum (anyhow only in main.rs and the CLI \
                 modules, cli.rs, cli_*.rs and *_cli.rs, which turn typed errors into a message)"
                    .to_string(),
            ));
        }
    }
    report(failures);
}

// ---------------------------------------------------------------------------------------------
// Reading Rust without a parser: rustfmt-formatted code, comments and string contents removed.
// ---------------------------------------------------------------------------------------------

/// Which lines (by index) are test code, and the names of out-of-line test modules
/// (`#[cfg(test)] mod name;`). A column-0 `#[cfg(test)]` gates the next item (after further
/// attributes and comments): up to its `;` when the item is one line, else up to the next line
/// that is `}` or `};` at column 0, which is where rustfmt closes a top-level item.
fn test_regions(text: &str) -> (Vec<bool>, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut test = vec![false; lines.len()];
    let mut modules = Vec::new();
    if lines.iter().any(|l| l.trim_end() == "#![cfg(test)]") {
        return (vec![true; lines.len()], modules);
    }
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "#[cfg(test)]" {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < lines.len() && (lines[j].starts_with("#[") || lines[j].starts_with("//")) {
            j += 1;
        }
        let mut end = j.min(lines.len().saturating_sub(1));
        if let Some(header) = lines.get(j).map(|l| l.trim_end()) {
            if header.ends_with(';') || header.ends_with('}') {
                if let Some(name) = out_of_line_module(header) {
                    modules.push(name);
                }
            } else {
                // The item's closing brace is the first at column 0 (rustfmt's layout), with or
                // without a comment after it: `} // tests` must not hide the code that follows.
                end = (j + 1..lines.len()).find(|&k| lines[k].starts_with('}')).unwrap_or(lines.len() - 1);
            }
        }
        for t in &mut test[i..=end] {
            *t = true;
        }
        i = end + 1;
    }
    (test, modules)
}

/// `name` of `mod name;`, `pub mod name;`, `pub(crate) mod name;`.
fn out_of_line_module(line: &str) -> Option<String> {
    let rest = line.strip_suffix(';')?;
    let rest = rest.strip_prefix("pub ").or_else(|| rest.strip_prefix("pub(crate) ")).unwrap_or(rest);
    let name = rest.strip_prefix("mod ")?.trim();
    name.chars().all(|c| c.is_alphanumeric() || c == '_').then(|| name.to_string())
}

/// The code of each line with comments removed and string and char literals emptied (`""`), so
/// that a doc comment or an error message that names `std::fs` is not an import. Block comments,
/// multi-line strings and raw strings carry over lines.
fn code_lines(text: &str) -> Vec<String> {
    #[derive(Clone, Copy)]
    enum State {
        Code,
        Str,
        Raw(usize),
        Block(usize),
    }
    let mut state = State::Code;
    let mut out = Vec::new();
    for line in text.lines() {
        let chars: Vec<char> = line.chars().collect();
        let mut code = String::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            match state {
                State::Code => {
                    if c == '/' && next == Some('/') {
                        break;
                    } else if c == '/' && next == Some('*') {
                        state = State::Block(1);
                        i += 2;
                        continue;
                    } else if c == '"' {
                        code.push('"');
                        state = State::Str;
                    } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&chars, i) {
                        let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
                        if chars.get(i + 1 + hashes) == Some(&'"') {
                            code.push('"');
                            state = State::Raw(hashes);
                            i += 2 + hashes;
                            continue;
                        }
                        code.push(c);
                    } else if c == '\'' {
                        // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): only the former is skipped.
                        if next == Some('\\') {
                            let close =
                                chars.iter().skip(i + 3).position(|&q| q == '\'').map_or(chars.len(), |p| i + 3 + p);
                            code.push_str("' '");
                            i = close + 1;
                            continue;
                        } else if chars.get(i + 2) == Some(&'\'') {
                            code.push_str("' '");
                            i += 3;
                            continue;
                        }
                        code.push(c);
                    } else {
                        code.push(c);
                    }
                }
                State::Str => {
                    if c == '\\' {
                        i += 2;
                        continue;
                    } else if c == '"' {
                        code.push('"');
                        state = State::Code;
                    }
                }
                State::Raw(hashes) => {
                    if c == '"' && chars[i + 1..].iter().take(hashes).filter(|&&h| h == '#').count() == hashes {
                        code.push('"');
                        state = State::Code;
                        i += 1 + hashes;
                        continue;
                    }
                }
                State::Block(depth) => {
                    if c == '*' && next == Some('/') {
                        state = if depth == 1 { State::Code } else { State::Block(depth - 1) };
                        i += 2;
                        continue;
                    } else if c == '/' && next == Some('*') {
                        state = State::Block(depth + 1);
                        i += 2;
                        continue;
                    }
                }
            }
            i += 1;
        }
        out.push(code);
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && is_ident(chars[i - 1])
}

/// Non-test code lines, numbered from 1.
fn non_test_code(text: &str) -> Vec<(usize, String)> {
    let (test, _) = test_regions(text);
    code_lines(text)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !test.get(*i).copied().unwrap_or(false))
        .map(|(i, l)| (i + 1, l))
        .collect()
}

/// Byte offsets in `code` where `needle` starts as a whole path: no identifier character right
/// before it, and none right after it when it ends in an identifier character.
fn path_matches(code: &str, needle: &str) -> Vec<usize> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find(needle).map(|p| p + from) {
        let before = code[..at].chars().next_back();
        let after = code[at + needle.len()..].chars().next();
        let open_after = !needle.ends_with(is_ident) || !after.is_some_and(is_ident);
        if !before.is_some_and(is_ident) && open_after {
            found.push(at);
        }
        from = at + needle.len();
    }
    found
}

/// Every path a `use` item brings in, braces expanded: `use std::{fs, io::Read};` gives
/// `std::fs`, `std::io::Read`. Aliases and `self` are dropped.
fn expand_use(tree: &str) -> Vec<String> {
    fn go(prefix: &str, tree: &str, out: &mut Vec<String>) {
        let tree = tree.trim();
        let tree = tree.split(" as ").next().unwrap_or(tree).trim();
        match tree.find('{') {
            None => {
                let path = format!("{prefix}{tree}");
                out.push(path.strip_suffix("::self").unwrap_or(&path).to_string());
            }
            Some(open) => {
                let head = &tree[..open];
                let inner = tree[open + 1..].strip_suffix('}').unwrap_or(&tree[open + 1..]);
                let mut depth = 0;
                let mut start = 0;
                let mut parts = Vec::new();
                for (k, c) in inner.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            parts.push(&inner[start..k]);
                            start = k + 1;
                        }
                        _ => {}
                    }
                }
                parts.push(&inner[start..]);
                for part in parts.into_iter().filter(|p| !p.trim().is_empty()) {
                    go(&format!("{prefix}{head}"), part, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    go("", tree.trim_start_matches("::"), &mut out);
    out
}

/// The `use` items of some code lines, each with the line it starts on and its tree.
fn use_items(code: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut items = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (line, text) in code {
        let t = text.trim();
        if let Some((_, acc)) = open.as_mut() {
            acc.push_str(t);
        } else {
            let body = t.strip_prefix("pub ").or_else(|| t.strip_prefix("pub(crate) ")).unwrap_or(t);
            let Some(rest) = body.strip_prefix("use ") else { continue };
            open = Some((*line, rest.to_string()));
        }
        if let Some((start, acc)) = open.take_if(|(_, acc)| acc.ends_with(';')) {
            items.push((start, acc.trim_end_matches(';').to_string()));
        }
    }
    items
}

// ---------------------------------------------------------------------------------------------
// Rule 1: sans-IO.
// ---------------------------------------------------------------------------------------------

/// What a sans-IO module may not reach for: (item, the needles that find it in code or in an
/// expanded `use` path, why it is I/O).
const SANS_IO_FORBIDDEN: &[(&str, &[&str], &str)] = &[
    ("tokio", &["tokio", "tokio_stream", "tokio_rustls"], "an async runtime"),
    ("tonic", &["tonic", "tonic_prost"], "the gRPC stack"),
    ("hyper", &["hyper", "hyper_util"], "the HTTP stack"),
    ("std::fs", &["std::fs"], "the file system"),
    ("std::net", &["std::net"], "sockets"),
    ("std::process", &["std::process"], "processes"),
    ("std::thread::sleep", &["std::thread::sleep", "thread::sleep"], "sleeping"),
    ("Instant::now", &["Instant::now"], "the clock"),
    ("SystemTime::now", &["SystemTime::now"], "the clock"),
];

#[derive(Debug, PartialEq, Eq)]
struct SansIoFinding {
    line: usize,
    item: &'static str,
    why: &'static str,
}

impl SansIoFinding {
    fn message(&self) -> String {
        format!(
            "a sans-IO module uses `{}` ({}): take what it gives as an argument (time as `now`, bytes in, \
             effects out) and do the I/O in the caller; or, if this file is not sans-IO, add it with a reason \
             to SANS_IO_EXCEPTIONS in tests/tests/tidy.rs",
            self.item, self.why
        )
    }
}

/// Every use of a forbidden item in the non-test code of `text`, once per line and item.
fn sans_io_findings(text: &str) -> Vec<SansIoFinding> {
    let code = non_test_code(text);
    let mut found = BTreeSet::new();
    let crate_root = |path: &str, needle: &str| {
        if needle.contains("::") {
            path == needle || path.starts_with(&format!("{needle}::"))
        } else {
            path.split("::").next() == Some(needle)
        }
    };
    for (line, tree) in use_items(&code) {
        for path in expand_use(&tree) {
            for (k, (_, needles, _)) in SANS_IO_FORBIDDEN.iter().enumerate() {
                if needles.iter().any(|n| crate_root(&path, n)) {
                    found.insert((line, k));
                }
            }
        }
    }
    for (line, text) in &code {
        for (k, (_, needles, _)) in SANS_IO_FORBIDDEN.iter().enumerate() {
            let in_path = needles.iter().any(|n| {
                let needle = if n.contains("::") { n.to_string() } else { format!("{n}::") };
                !path_matches(text, &needle).is_empty()
            });
            let extern_crate = needles.iter().any(|n| text.trim() == format!("extern crate {n};"));
            if in_path || extern_crate {
                found.insert((*line, k));
            }
        }
    }
    found
        .into_iter()
        .map(|(line, k)| SansIoFinding { line, item: SANS_IO_FORBIDDEN[k].0, why: SANS_IO_FORBIDDEN[k].2 })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Rule 2: crate boundaries.
// ---------------------------------------------------------------------------------------------

/// Each dependency a manifest declares in `[dependencies]`, `[dev-dependencies]` or
/// `[build-dependencies]` (also under `[target.….dependencies]` and as `[dependencies.name]`
/// tables, and through `package = "…"` renames): (line, section, package).
fn manifest_dependencies(text: &str) -> Vec<(usize, String, String)> {
    const KINDS: [&str; 3] = ["dependencies", "dev-dependencies", "build-dependencies"];
    let is_kind = |s: &str| KINDS.iter().any(|k| s == *k || s.ends_with(&format!(".{k}")));
    let mut deps = Vec::new();
    let mut section: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if let Some(header) = line.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let header = header.trim();
            section = None;
            if is_kind(header) {
                section = Some(header.to_string());
            } else if let Some((table, name)) = header.rsplit_once('.').filter(|(t, _)| is_kind(t)) {
                // `[dependencies.name]`: the table names the dependency; its keys follow.
                deps.push((i + 1, table.to_string(), name.trim_matches('"').to_string()));
                section = Some(format!("{table}.{name}"));
            }
            continue;
        }
        let Some(current) = section.as_ref() else { continue };
        let Some((key, value)) = line.split_once('=') else { continue };
        if is_kind(current) {
            let name = key.split('.').next().unwrap_or(key).trim().trim_matches('"');
            deps.push((i + 1, current.clone(), name.to_string()));
        }
        if key.trim() == "package" || value.contains("package") {
            let renamed = if key.trim() == "package" { value } else { value.split("package").nth(1).unwrap_or("") };
            if let Some(package) = renamed.split('"').nth(1) {
                deps.push((i + 1, current.clone(), package.to_string()));
            }
        }
    }
    deps
}

fn dependency_failures(manifest: &str, text: &str, forbidden: &[&str]) -> Vec<Failure> {
    manifest_dependencies(text)
        .into_iter()
        .filter(|(_, _, name)| forbidden.contains(&name.as_str()))
        .map(|(line, section, name)| {
            Failure::new(
                manifest,
                line,
                "crate-boundary",
                format!(
                    "[{section}] names {name}: node and coordinator meet only in sanctum-protocol; move what both need \
                     there (protocol depends on neither)"
                ),
            )
        })
        .collect()
}

/// Any path through a forbidden crate (`use sanctum_node…`, `sanctum_node::x`, `extern crate`) in
/// the code of `text`, test code included (a dev-dependency is forbidden too).
fn import_failures(path: &str, text: &str, forbidden: &[&str]) -> Vec<Failure> {
    let mut failures = Vec::new();
    for (i, line) in code_lines(text).iter().enumerate() {
        for package in forbidden {
            let krate = package.replace('-', "_");
            if !path_matches(line, &krate).is_empty() {
                failures.push(Failure::new(
                    path,
                    i + 1,
                    "crate-boundary",
                    format!(
                        "uses `{krate}`: node and coordinator meet only in sanctum-protocol; move what both need there"
                    ),
                ));
            }
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// Rule 3: file length.
// ---------------------------------------------------------------------------------------------

/// Lines of a file that are not test code.
fn counted_lines(text: &str) -> usize {
    test_regions(text).0.iter().filter(|t| !**t).count()
}

/// The `//! Length: …` reason in the file's leading `//!` block, if it gives one.
fn length_reason(text: &str) -> Option<&str> {
    text.lines()
        .take_while(|l| l.starts_with("//!"))
        .find_map(|l| l.strip_prefix("//! Length:"))
        .map(str::trim)
        .filter(|reason| reason.len() >= 20)
}

fn length_failure(path: &str, text: &str, test_only: bool) -> Option<Failure> {
    let n = counted_lines(text);
    if test_only || n <= MAX_LINES || length_reason(text).is_some() {
        return None;
    }
    Some(Failure::new(
        path,
        MAX_LINES + 1,
        "length",
        format!(
            "{n} lines of non-test code (limit {MAX_LINES}): split it by job, or, if it is one job, add a \
             `//! Length: <why it stays one file>` line to its `//!` header"
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Rule 4: `Result<_, String>`.
// ---------------------------------------------------------------------------------------------

/// The lines (from 1) of each `Result<…, String>` in the non-test code of `text`: a `Result` whose
/// last generic argument is `String`, written on one line or across several.
fn string_error_lines(text: &str) -> Vec<usize> {
    let code = non_test_code(text);
    let mut joined = String::new();
    // (byte offset where a line starts in `joined`, its line number)
    let mut line_of = Vec::new();
    for (line, l) in &code {
        line_of.push((joined.len(), *line));
        joined.push_str(l);
        joined.push('\n');
    }
    let bytes = joined.as_bytes();
    let mut lines = Vec::new();
    for at in path_matches(&joined, "Result<") {
        // Just inside `Result<`: split its arguments at the commas of this level.
        let mut depth = 1usize;
        let mut parts: Vec<String> = vec![String::new()];
        let mut k = at + "Result<".len();
        while k < bytes.len() {
            let c = bytes[k] as char;
            match c {
                '<' | '(' | '[' => depth += 1,
                '>' if bytes[k - 1] == b'-' => {}
                '>' | ')' | ']' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                ',' if depth == 1 => {
                    parts.push(String::new());
                    k += 1;
                    continue;
                }
                _ => {}
            }
            if let Some(last) = parts.last_mut() {
                last.push(c);
            }
            k += 1;
        }
        let parts: Vec<&str> = parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).collect();
        if parts.len() == 2 && matches!(parts[1], "String" | "std::string::String") {
            let line = line_of.iter().rev().find(|(start, _)| *start <= at).map_or(0, |(_, l)| *l);
            lines.push(line);
        }
    }
    lines
}

// ---------------------------------------------------------------------------------------------
// Rule 5: anyhow at the edges only.
// ---------------------------------------------------------------------------------------------

/// The lines (from 1) of the non-test code of `text` that name the `anyhow` crate (a path, a
/// `use`, a macro).
fn anyhow_lines(text: &str) -> Vec<usize> {
    non_test_code(text).into_iter().filter(|(_, l)| !path_matches(l, "anyhow").is_empty()).map(|(n, _)| n).collect()
}

// ---------------------------------------------------------------------------------------------
// The checkers on small sources: each catches what it is for, and lets clean code pass.
// ---------------------------------------------------------------------------------------------

#[test]
fn each_checker_catches_its_violation() {
    // 1. sans-IO: a grouped import, a path in code, the clock, a runtime; not in comments,
    // strings or test code.
    let src = "//! doc that names std::fs and tokio\n\
               use std::{collections::BTreeMap, fs};\n\
               use std::time::{Duration, Instant};\n\
               fn f() { let t = Instant::now(); let s = \"std::net\"; }\n\
               fn g() { tokio::spawn(async {}); std::thread::sleep(Duration::ZERO); }\n\
               use tonic::Status;\n\
               #[cfg(test)]\n\
               mod tests {\n    use std::net::TcpListener;\n}\n";
    let found: Vec<(usize, &str)> = sans_io_findings(src).iter().map(|f| (f.line, f.item)).collect();
    assert_eq!(found, vec![(2, "std::fs"), (4, "Instant::now"), (5, "tokio"), (5, "std::thread::sleep"), (6, "tonic")]);

    // 2. crate boundaries: every dependency kind and table form, and imports.
    let manifest = "[package]\nname = \"sanctum-node\"\n\n[dependencies]\nsanctum-protocol.workspace = true\n\
                    sanctum-coordinator = { path = \"../coordinator\" }\n\n[dev-dependencies]\n\
                    coord = { package = \"sanctum-coordinator\", path = \"../coordinator\" }\n\n\
                    [build-dependencies.sanctum-coordinator]\npath = \"../coordinator\"\n";
    let lines: Vec<usize> =
        dependency_failures("node/Cargo.toml", manifest, &["sanctum-coordinator"]).iter().map(|f| f.line).collect();
    assert_eq!(lines, vec![6, 9, 11]);
    let src =
        "use sanctum_protocol::plan;\nuse sanctum_coordinator::round::PlanRun;\nfn f() { sanctum_coordinator::x(); }\n";
    let lines: Vec<usize> =
        import_failures("node/src/x.rs", src, &["sanctum-coordinator"]).iter().map(|f| f.line).collect();
    assert_eq!(lines, vec![2, 3]);

    // 3. length: 601 lines of code fail; an inline test module does not count; a reason passes.
    let long = format!("//! A module.\n{}", "fn f() {}\n".repeat(600));
    let failure = length_failure("node/src/x.rs", &long, false).unwrap();
    assert_eq!((failure.line, failure.rule), (601, "length"));
    assert!(failure.message.starts_with("601 lines"), "{}", failure.message);
    let with_tests = format!(
        "//! A module.\n{}#[cfg(test)]\nmod tests {{\n{}}}\n",
        "fn f() {}\n".repeat(500),
        "    fn g() {}\n".repeat(200)
    );
    assert_eq!(counted_lines(&with_tests), 501);
    assert_eq!(length_failure("node/src/x.rs", &with_tests, false), None);
    let reasoned = format!(
        "//! A module.\n//! Length: one table of rules, each with its test fixture.\n{}",
        "fn f() {}\n".repeat(600)
    );
    assert_eq!(length_failure("node/src/x.rs", &reasoned, false), None);
    let no_reason = format!("//! A module.\n//! Length:\n{}", "fn f() {}\n".repeat(600));
    assert!(length_failure("node/src/x.rs", &no_reason, false).is_some(), "an empty reason is no reason");

    // 4. `Result<_, String>`: one-line, nested and multi-line forms; not other errors, comments or tests.
    let src = "fn a() -> Result<(), String> { Ok(()) }\n\
               fn b() -> Result<Vec<Result<u8, String>>, Error> { todo() }\n\
               fn c() -> Result<\n    BTreeMap<String, u8>,\n    String,\n> { todo() }\n\
               fn d() -> io::Result<String> { todo() }\n\
               fn e() -> MyResult<u8, String> { todo() }\n\
               // fn f() -> Result<(), String>\n\
               fn g(f: impl Fn() -> u8) -> std::result::Result<fn() -> u8, String> { todo() }\n\
               #[cfg(test)]\nmod tests {\n    fn h() -> Result<(), String> { Ok(()) }\n}\n";
    assert_eq!(string_error_lines(src), vec![1, 2, 3, 10]);

    // 5. anyhow: a path, a macro, a use; not a word inside an identifier, comments or tests.
    let src = "use anyhow::Context;\n\
               fn a() -> anyhow::Result<()> { anyhow::bail!(\"x\") }\n\
               fn b() { let not_anyhow = 1; } // anyhow\n\
               #[cfg(test)]\nmod tests {\n    fn t() -> anyhow::Result<()> { Ok(()) }\n}\n";
    assert_eq!(anyhow_lines(src), vec![1, 2]);
    // A test module closed with a comment after its brace hides nothing after it.
    let src = "#[cfg(test)]\nmod tests {\n    use anyhow::Result;\n} // tests\nuse anyhow::Context;\n";
    assert_eq!(anyhow_lines(src), vec![5]);
    assert!(is_binary_or_cli("coordinator/src/plan_cli.rs") && is_binary_or_cli("node/src/cli_data.rs"));
    assert!(!is_binary_or_cli("coordinator/src/client.rs"), "a name that merely holds `cli` is library code");
}

#[test]
fn a_clean_source_passes_every_checker() {
    let src = "//! A round state machine.\n\
               use std::collections::BTreeMap;\n\
               use std::time::Duration;\n\
               use crate::plan::Plan;\n\
               /// Uses no `std::fs`: the caller passes `now`.\n\
               pub fn step(now: Duration, plan: &Plan) -> Result<BTreeMap<String, u8>, StepError> {\n\
               \x20   let _ = (now, plan, \"tokio::spawn\", '\"', r#\"Instant::now\"#);\n\
               \x20   todo()\n\
               }\n\
               #[cfg(test)]\n\
               mod tests {\n    use std::fs;\n    fn t() -> Result<(), String> { let _ = std::time::Instant::now(); Ok(()) }\n}\n";
    assert_eq!(sans_io_findings(src), vec![]);
    assert_eq!(import_failures("node/src/x.rs", src, &["sanctum-coordinator"]), vec![]);
    assert_eq!(length_failure("node/src/x.rs", src, false), None);
    assert_eq!(string_error_lines(src), Vec::<usize>::new());
    assert_eq!(anyhow_lines(src), Vec::<usize>::new());
    let manifest = "[package]\nname = \"sanctum-node\"\n\n[dependencies]\nsanctum-protocol.workspace = true\n\
                    tokio.workspace = true\n\n[dev-dependencies]\ntempfile.workspace = true\n";
    assert_eq!(dependency_failures("node/Cargo.toml", manifest, &["sanctum-coordinator"]), vec![]);
    // The out-of-line test module and the test-only file it names.
    let lib = "//! Lib.\npub mod plan;\n#[cfg(test)]\n#[allow(dead_code)]\npub(crate) mod schema;\npub mod tls;\n";
    assert_eq!(test_module_paths("protocol/src/lib.rs", lib), vec!["protocol/src/schema".to_string()]);
    assert_eq!(counted_lines(lib), 3);
}
