//! docs/protocol.md and the code agree on every error code and close code,
//! in both directions, and every one of them is exercised by some test.

use std::collections::BTreeSet;

use ridelock::protocol::ErrorCode;
use ridelock::session::CLOSE_CODES;

fn protocol_doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap()
}

/// The rows of the table under `heading`: the first cell of each.
fn first_cells(doc: &str, heading: &str) -> Vec<String> {
    let section = doc
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("no {heading} in docs/protocol.md"));
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|line| line.starts_with("| ") && !line.starts_with("| ---"))
        .skip(1) // the header row
        .map(|line| line.split('|').nth(1).unwrap().trim().to_string())
        .collect()
}

/// Every test source, to look for uses of a code.
fn test_sources() -> String {
    let mut all = String::new();
    for dir in ["tests", "simulator/tests", "src", "src/cluster"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                // Library files count only for their test modules.
                let text = match text.find("#[cfg(test)]") {
                    Some(at) if path.to_string_lossy().contains("/src/") => text[at..].to_string(),
                    Some(_) | None if path.to_string_lossy().contains("/src/") => String::new(),
                    _ => text,
                };
                all.push_str(&text);
            }
        }
    }
    all
}

#[test]
fn error_codes_in_the_docs_are_the_codes_in_the_code() {
    let documented: BTreeSet<String> = first_cells(&protocol_doc(), "## Error codes")
        .into_iter()
        .map(|cell| cell.trim_matches('`').to_string())
        .collect();
    let in_code: BTreeSet<String> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_string())
        .collect();
    assert_eq!(documented, in_code, "docs/protocol.md vs ErrorCode::ALL");
}

#[test]
fn close_codes_in_the_docs_are_the_codes_the_engine_sends() {
    let documented: BTreeSet<u16> =
        first_cells(&protocol_doc(), "## Connection limits and close codes")
            .into_iter()
            .map(|cell| {
                cell.split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap_or_else(|e| panic!("{cell}: {e}"))
            })
            .collect();
    let sent: BTreeSet<u16> = CLOSE_CODES.into_iter().collect();
    assert_eq!(documented, sent, "docs/protocol.md vs session::CLOSE_CODES");
}

#[test]
fn every_code_is_exercised_by_a_test() {
    let sources = test_sources();
    for code in ErrorCode::ALL {
        let used = sources.contains(&format!("\"{}\"", code.as_str()))
            || sources.contains(&format!("ErrorCode::{code:?}"));
        assert!(used, "no test expects {}", code.as_str());
    }
    for code in CLOSE_CODES {
        assert!(
            sources.contains(&format!("Some({code})")) || sources.contains(&format!(", {code})")),
            "no test expects close code {code}"
        );
    }
}
