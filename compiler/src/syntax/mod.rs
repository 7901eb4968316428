//! The model DSL's front end: source files, the pest grammar
//! (`grammar/tessera.pest`) and the syntax tree.
//!
//! Invariant: parsing never panics and never recurses without bound; every
//! failure is a `Diagnostic` with file, line, column and a caret.

pub mod ast;
mod parser;
pub mod source;

pub use parser::parse_file;
pub use source::{Diagnostic, FileId, SourceFile, SourceMap, Span};

/// Parses `text` as a standalone file named `name` (for tests and fuzzing).
pub fn parse_str(name: &str, text: &str) -> Result<ast::File, Diagnostic> {
    let mut map = SourceMap::new();
    let id = map.add(name, text);
    parse_file(&map, id)
}
