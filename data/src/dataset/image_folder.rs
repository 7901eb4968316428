//! torchvision's `ImageFolder` index (`torchvision/datasets/folder.py`):
//! classes are the sorted names of the root's sub-directories, a class's
//! index is its position, and its samples are the files with an image
//! extension found by `os.walk` below the class directory (symlinks
//! followed), walk roots sorted and file names sorted within each root.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// torchvision's `IMG_EXTENSIONS`, matched case-insensitively against the end
/// of the file name (`has_file_allowed_extension`). Only JPEG and PNG decode
/// here; the others are listed (as torchvision does) and become gray images
/// with a warning.
pub const IMG_EXTENSIONS: [&str; 9] = [".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"];

/// The file list of an ImageFolder tree.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Class names, sorted; a sample's label is its class's position here.
    pub classes: Vec<String>,
    /// (file, class index), in torchvision's order.
    pub samples: Vec<(PathBuf, usize)>,
}

/// Why a tree is not a usable ImageFolder (the caller adds the config key).
#[derive(Debug)]
pub enum FolderError {
    Missing,
    NotADirectory,
    Unreadable(PathBuf, std::io::Error),
    NoClasses,
    EmptyClass(Vec<String>),
}

fn has_image_extension(name: &OsString) -> bool {
    let lower = name.to_string_lossy().to_lowercase();
    IMG_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
}

/// Byte order of the OS string, which is Python's code-point order for UTF-8
/// names (`sorted()` on `str`).
fn sort_key(s: &OsString) -> &[u8] {
    s.as_encoded_bytes()
}

/// Entries of one directory split into (sub-directories, files); symlinks
/// are followed as `os.walk(followlinks=True)` and `entry.is_dir()` do.
fn list_dir(dir: &Path) -> Result<(Vec<OsString>, Vec<OsString>), FolderError> {
    let read = std::fs::read_dir(dir).map_err(|e| FolderError::Unreadable(dir.to_path_buf(), e))?;
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    for entry in read {
        let entry = entry.map_err(|e| FolderError::Unreadable(dir.to_path_buf(), e))?;
        // The entry's own type needs no stat (d_type, as scandir); only
        // symlinks are followed with one. A dangling link counts as a file, as in os.walk.
        let is_dir = match entry.file_type() {
            Ok(t) if t.is_symlink() => std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()),
            Ok(t) => t.is_dir(),
            Err(_) => std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()),
        };
        if is_dir {
            dirs.push(entry.file_name());
        } else {
            files.push(entry.file_name());
        }
    }
    dirs.sort_by(|a, b| sort_key(a).cmp(sort_key(b)));
    files.sort_by(|a, b| sort_key(a).cmp(sort_key(b)));
    Ok((dirs, files))
}

/// `sorted(os.walk(top, followlinks=True))`: every directory below `top` with
/// its files, ordered by the directory's path string. Directories already
/// visited (symlink cycles) are skipped.
fn walk(top: &Path) -> Result<Vec<(PathBuf, Vec<OsString>)>, FolderError> {
    let mut out = Vec::new();
    let mut stack = vec![top.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    while let Some(dir) = stack.pop() {
        if let Ok(canonical) = std::fs::canonicalize(&dir) {
            if !seen.insert(canonical) {
                continue;
            }
        }
        let (dirs, files) = list_dir(&dir)?;
        stack.extend(dirs.into_iter().map(|d| dir.join(d)));
        out.push((dir, files));
    }
    out.sort_by(|a, b| a.0.as_os_str().as_encoded_bytes().cmp(b.0.as_os_str().as_encoded_bytes()));
    Ok(out)
}

impl ImageFolder {
    /// Indexes `root` (`ImageFolder(root)`): errors as torchvision raises them
    /// (no class folder, a class with no image file).
    pub fn scan(root: &Path) -> Result<ImageFolder, FolderError> {
        match std::fs::metadata(root) {
            Err(_) => return Err(FolderError::Missing),
            Ok(m) if !m.is_dir() => return Err(FolderError::NotADirectory),
            Ok(_) => {}
        }
        let (class_dirs, _) = list_dir(root)?;
        if class_dirs.is_empty() {
            return Err(FolderError::NoClasses);
        }
        let classes: Vec<String> = class_dirs.iter().map(|c| c.to_string_lossy().into_owned()).collect();
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (index, class_dir) in class_dirs.iter().enumerate() {
            let before = samples.len();
            for (dir, files) in walk(&root.join(class_dir))? {
                samples.extend(files.iter().filter(|f| has_image_extension(f)).map(|f| (dir.join(f), index)));
            }
            if samples.len() == before {
                empty.push(classes[index].clone());
            }
        }
        if !empty.is_empty() {
            return Err(FolderError::EmptyClass(empty));
        }
        Ok(ImageFolder { root: root.to_path_buf(), classes, samples })
    }
}
