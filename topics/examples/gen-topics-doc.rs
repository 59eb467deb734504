//! Prints `docs/topics.md`: `cargo run -p topics --example gen-topics-doc > docs/topics.md`.
fn main() {
    print!("{}", topics::reference::markdown());
}
