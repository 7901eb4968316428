//! A program: every `.tsr` file of a compilation, parsed, with imports resolved
//! into per-file namespaces and the trunk / head / loss registries.

use crate::syntax::ast::{BlockDef, BlockKind, Constant, File};
use crate::syntax::{parse_file, Diagnostic, FileId, SourceMap, Span};
use include_dir::{include_dir, Dir};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The model files shipped in `models/`, embedded so the binary works anywhere.
static EMBEDDED_MODELS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/../models");

/// A block, by the file that defines it and its index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    pub file: FileId,
    pub index: usize,
}

#[derive(Debug, Default)]
pub struct Program {
    pub map: SourceMap,
    files: Vec<File>,
    /// Blocks visible from each file: its own and those of the files it imports.
    namespaces: Vec<HashMap<String, BlockRef>>,
    /// Trunks, heads and losses of all files, by kind and name.
    registry: BTreeMap<(u8, String), BlockRef>,
}

fn kind_key(k: BlockKind) -> u8 {
    k as u8
}

impl Program {
    /// The embedded `models/` directory, overlaid by the `.tsr` files of
    /// `extra_dirs` (a user's own models; same names replace embedded ones).
    pub fn load(extra_dirs: &[PathBuf]) -> Result<Program, Diagnostic> {
        // Relative name -> (the name diagnostics show, text).
        let mut sources: BTreeMap<String, (String, String)> = BTreeMap::new();
        collect_embedded(&EMBEDDED_MODELS, &mut sources);
        for dir in extra_dirs {
            collect_dir(dir, dir, &mut sources).map_err(|e| io_diag(&dir.display().to_string(), e))?;
        }
        Program::from_shown_sources(sources.into_iter().map(|(name, (shown, text))| (name, shown, text)).collect())
    }

    /// Builds a program from (path, text) pairs; paths are relative names like
    /// `layers.tsr` or `heads/mlp.tsr`, and imports are resolved against them.
    pub fn from_sources(sources: Vec<(String, String)>) -> Result<Program, Diagnostic> {
        Program::from_shown_sources(sources.into_iter().map(|(name, text)| (name, String::new(), text)).collect())
    }

    /// `from_sources` with the name each file shows in diagnostics (empty:
    /// `models/<path>`, as an embedded file).
    fn from_shown_sources(sources: Vec<(String, String, String)>) -> Result<Program, Diagnostic> {
        let mut p = Program::default();
        for (name, shown, text) in &sources {
            let key = format!("models/{name}");
            let shown = if shown.is_empty() { key.clone() } else { shown.clone() };
            p.map.add_shown(key, shown, text.clone());
        }
        for i in 0..sources.len() {
            let f = parse_file(&p.map, FileId(i as u32))?;
            p.files.push(f);
        }
        for i in 0..p.files.len() {
            let ns = p.namespace_of(FileId(i as u32))?;
            p.namespaces.push(ns);
        }
        for (i, f) in p.files.iter().enumerate() {
            for (j, b) in f.blocks.iter().enumerate() {
                if b.kind == BlockKind::Block {
                    continue;
                }
                let r = BlockRef { file: FileId(i as u32), index: j };
                if let Some(prev) = p.registry.insert((kind_key(b.kind), b.name.clone()), r) {
                    let first = p.block(prev);
                    let (l, _) = p.map.file(prev.file).line_col(first.span.start as usize);
                    return Err(p.map.diagnostic(
                        name_span(b),
                        format!(
                            "{} `{}` is defined twice (first in {}:{l})",
                            b.kind.keyword(),
                            b.name,
                            p.map.file(prev.file).name
                        ),
                    ));
                }
            }
        }
        Ok(p)
    }

    fn namespace_of(&self, id: FileId) -> Result<HashMap<String, BlockRef>, Diagnostic> {
        let mut ns: HashMap<String, BlockRef> = HashMap::new();
        let add = |file: FileId, ns: &mut HashMap<String, BlockRef>| -> Result<(), Diagnostic> {
            for (j, b) in self.files[file.0 as usize].blocks.iter().enumerate() {
                let r = BlockRef { file, index: j };
                if let Some(prev) = ns.insert(b.name.clone(), r) {
                    if prev != r {
                        return Err(self.map.diagnostic(
                            name_span(b),
                            format!("`{}` is already defined in {}", b.name, self.map.file(prev.file).name),
                        ));
                    }
                }
            }
            Ok(())
        };
        add(id, &mut ns)?;
        let here = &self.map.file(id).key;
        for (path, span) in &self.files[id.0 as usize].imports {
            let target = resolve_import(here, path);
            let Some(fid) = self.map.find(&target) else {
                return Err(self
                    .map
                    .diagnostic(*span, format!("cannot find imported file `{path}` (looked for `{target}`)")));
            };
            add(fid, &mut ns)?;
        }
        Ok(ns)
    }

    pub fn file(&self, id: FileId) -> &File {
        &self.files[id.0 as usize]
    }

    pub fn block(&self, r: BlockRef) -> &BlockDef {
        &self.files[r.file.0 as usize].blocks[r.index]
    }

    /// A block visible from `file` by name.
    pub fn lookup(&self, file: FileId, name: &str) -> Option<BlockRef> {
        self.namespaces[file.0 as usize].get(name).copied()
    }

    /// Names visible from `file` (for did-you-mean hints).
    pub fn visible_names(&self, file: FileId) -> impl Iterator<Item = &str> {
        self.namespaces[file.0 as usize].keys().map(|s| s.as_str())
    }

    pub fn constant(&self, file: FileId, name: &str) -> Option<&Constant> {
        self.files[file.0 as usize].constants.iter().find(|c| c.name == name)
    }

    /// A trunk, head or loss by its registry name.
    pub fn registered(&self, kind: BlockKind, name: &str) -> Option<BlockRef> {
        self.registry.get(&(kind_key(kind), name.to_string())).copied()
    }

    /// Registry names of one kind, sorted.
    pub fn registered_names(&self, kind: BlockKind) -> Vec<&str> {
        self.registry.keys().filter(|(k, _)| *k == kind_key(kind)).map(|(_, n)| n.as_str()).collect()
    }
}

fn name_span(b: &BlockDef) -> Span {
    b.span
}

/// `import "x.tsr"` inside `models/heads/mlp.tsr` means `models/heads/x.tsr`;
/// `..` segments are honoured.
fn resolve_import(importer: &str, path: &str) -> String {
    let mut parts: Vec<&str> = importer.split('/').collect();
    parts.pop();
    for seg in path.split('/') {
        match seg {
            "." | "" => {}
            ".." => {
                if parts.len() > 1 {
                    parts.pop();
                }
            }
            s => parts.push(s),
        }
    }
    parts.join("/")
}

fn collect_embedded(dir: &Dir<'static>, out: &mut BTreeMap<String, (String, String)>) {
    for f in dir.files() {
        if f.path().extension().is_some_and(|e| e == "tsr") {
            if let Some(text) = f.contents_utf8() {
                out.insert(f.path().to_string_lossy().replace('\\', "/"), (String::new(), text.to_string()));
            }
        }
    }
    for d in dir.dirs() {
        collect_embedded(d, out);
    }
}

fn collect_dir(root: &Path, dir: &Path, out: &mut BTreeMap<String, (String, String)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_dir(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "tsr") {
            let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
            // Shown by its real path: the user edits that file, not `models/…`.
            out.insert(rel, (path.display().to_string(), crate::config::read_text(&path)?));
        }
    }
    Ok(())
}

fn io_diag(path: &str, e: std::io::Error) -> Diagnostic {
    Diagnostic {
        message: format!("cannot read model directory: {e}"),
        file: path.to_string(),
        line: 1,
        col: 1,
        source_line: String::new(),
        width: 1,
        notes: Vec::new(),
    }
}
