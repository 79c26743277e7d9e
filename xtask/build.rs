//! Empty: it exists for the `syn` build-dependency in `Cargo.toml`, which only aligns features
//! between CI's builds (see the comment there).
fn main() {}
