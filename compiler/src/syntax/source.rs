//! Source files, spans, and diagnostics rendered with the source line and a caret.

use std::fmt;
use std::sync::Arc;

/// Index of a file in a `SourceMap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub start: u32,
    pub end: u32,
}

#[derive(Debug)]
pub struct SourceFile {
    /// The name shown in diagnostics: `models/vision_transformer.tsr` for an
    /// embedded file, the real path for one of a `--models` directory.
    pub name: String,
    /// The name imports resolve against (`models/<path in its directory>`).
    pub key: String,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        let text = text.into();
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        let name = name.into();
        SourceFile { key: name.clone(), name, text, line_starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self.text.get(start..offset).map_or(offset - start, |s| s.chars().count());
        (line + 1, col + 1)
    }

    /// The text of a 1-based line, without its newline.
    pub fn line_text(&self, line: usize) -> &str {
        let start = self.line_starts.get(line - 1).copied().unwrap_or(self.text.len());
        let end = self.line_starts.get(line).map_or(self.text.len(), |&e| e.saturating_sub(1));
        self.text.get(start..end.max(start)).unwrap_or("").trim_end_matches('\r')
    }
}

/// All DSL files loaded for one compilation.
#[derive(Debug, Default, Clone)]
pub struct SourceMap {
    files: Vec<Arc<SourceFile>>,
}

impl SourceMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> FileId {
        self.files.push(Arc::new(SourceFile::new(name, text)));
        FileId(self.files.len() as u32 - 1)
    }

    pub fn file(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }

    /// A file whose imports resolve against `key` and whose diagnostics
    /// show `shown`.
    pub fn add_shown(&mut self, key: impl Into<String>, shown: impl Into<String>, text: impl Into<String>) -> FileId {
        let mut file = SourceFile::new(shown, text);
        file.key = key.into();
        self.files.push(Arc::new(file));
        FileId(self.files.len() as u32 - 1)
    }

    /// The file of import key `name` (`models/layers.tsr`).
    pub fn find(&self, name: &str) -> Option<FileId> {
        self.files.iter().position(|f| f.key == name).map(|i| FileId(i as u32))
    }

    /// A located message: file, line, column, the source line and a caret.
    pub fn diagnostic(&self, span: Span, message: impl Into<String>) -> Diagnostic {
        let file = self.file(span.file);
        let (line, col) = file.line_col(span.start as usize);
        let (end_line, end_col) = file.line_col(span.end as usize);
        let width = if end_line == line { end_col.saturating_sub(col).max(1) } else { 1 };
        Diagnostic {
            message: message.into(),
            file: file.name.clone(),
            line,
            col,
            source_line: file.line_text(line).to_string(),
            width,
            notes: Vec::new(),
        }
    }
}

/// An error in a DSL file, printed like a compiler diagnostic:
///
/// ```text
/// error: expected expression
///  --> models/vision_transformer.tsr:12:19
///    |
/// 12 |     x = linear(x, )
///    |                   ^
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub message: String,
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub source_line: String,
    pub width: usize,
    /// Context lines printed after the snippet (call stack, hints).
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = self.line.to_string();
        let pad = " ".repeat(num.len());
        writeln!(f, "error: {}", self.message)?;
        writeln!(f, "{pad}--> {}:{}:{}", self.file, self.line, self.col)?;
        writeln!(f, "{pad} |")?;
        let line = self.source_line.replace('\t', " ");
        writeln!(f, "{num} | {line}")?;
        let lead: String = " ".repeat(self.col.saturating_sub(1));
        write!(
            f,
            "{pad} | {lead}{}",
            "^".repeat(self.width.min(line.chars().count().saturating_sub(self.col - 1).max(1)))
        )?;
        for note in &self.notes {
            write!(f, "\n{pad} = {note}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}
