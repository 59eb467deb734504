//! Prints `docs/topics.md`: `cargo run -p topics --example gen-topics-doc > docs/topics.md`;
//! with `--mapping`, the mapping table of `docs/migration.md` (between its `mapping` markers).
fn main() {
    if std::env::args().nth(1).as_deref() == Some("--mapping") {
        print!("{}", topics::legacy_line::mapping_table());
    } else {
        print!("{}", topics::reference::markdown());
    }
}
