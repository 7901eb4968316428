//! Damage for the readers' property tests (issue 15: every reader of a file
//! returns a value or a clear error on any bytes, never panics, never
//! allocates what a length field claims before checking it): random bytes,
//! and edits of valid files made by tessera itself: flipped bits,
//! truncation, inserted and deleted bytes, spliced tokens, and, for JSON
//! files, values replaced by edge cases (huge, negative, wrong type) or
//! removed. Each crate's fuzz test includes this file by path.
//!
//! `TESSERA_FUZZ_CASES=N` runs N cases per property.

#![allow(dead_code)]

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};

/// The case count: `TESSERA_FUZZ_CASES`, else `default` (sized so that a
/// test takes seconds on two cores).
pub fn cases(default: u32) -> u32 {
    std::env::var("TESSERA_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// One edit of a file's bytes.
#[derive(Clone, Debug)]
pub enum Edit {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    /// Token `.1` of the list, inserted (or written over the bytes there).
    Token(Index, usize, bool),
}

pub fn edit(tokens: usize) -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Edit::Delete(i, n)),
        4 => (any::<Index>(), 0..tokens.max(1), any::<bool>()).prop_map(|(i, t, over)| Edit::Token(i, t, over)),
    ]
}

/// One to `max` edits.
pub fn edits(tokens: usize, max: usize) -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(tokens), 1..=max)
}

pub fn apply(bytes: &[u8], edits: &[Edit], tokens: &[&[u8]]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for e in edits {
        match e {
            Edit::Flip(i, bit) => {
                if !b.is_empty() {
                    let at = i.index(b.len());
                    b[at] ^= 1 << bit;
                }
            }
            Edit::Truncate(i) => b.truncate(i.index(b.len() + 1)),
            Edit::Insert(i, with) => {
                let at = i.index(b.len() + 1);
                b.splice(at..at, with.iter().copied());
            }
            Edit::Delete(i, n) => {
                let at = i.index(b.len() + 1);
                b.drain(at..(at + n).min(b.len()));
            }
            Edit::Token(i, t, over) => {
                let tok = tokens.get(*t).copied().unwrap_or(b"");
                let at = i.index(b.len() + 1);
                let end = if *over { (at + tok.len()).min(b.len()) } else { at };
                b.splice(at..end, tok.iter().copied());
            }
        }
    }
    b
}

/// Tokens that make byte edits of a JSON file land on its syntax and on
/// numbers a reader must bound.
pub const JSON_TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"\\",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e400",
    b"-0.0",
    b"18446744073709551615",
    b"18446744073709551616",
    b"9007199254740993",
    b"1152921504606846976",
    b"\"../x\"",
    b"\"/\"",
    b"[[[[[[[[",
    b"\"\\ud800\"",
];

/// Values a JSON field is replaced by: the edges of every type.
pub fn edge_values() -> Vec<Value> {
    vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1u64 << 53),
        json!((1u64 << 53) + 1),
        json!(1u64 << 60),
        json!(1u64 << 32),
        json!(0.5),
        json!(-1e308),
        json!(1e308),
        json!(""),
        json!("x"),
        json!("../x"),
        Value::Null,
        json!(true),
        json!([]),
        json!({}),
        json!([0]),
        json!([u64::MAX, 2]),
        json!([1u64 << 32, 1u64 << 32, 0]),
        json!([[1.0, 2.0]]),
    ]
}

/// An edit of a JSON tree: the node at `.0` (in document order, root
/// excluded) is replaced by a value like it (`.2` = `Like`: another number
/// for a number, a list one longer or shorter ...), by any edge value
/// (`Any`), or removed from its object or array (`Remove`); `.1` picks the
/// value.
pub type JsonEdit = (Index, Index, How);

#[derive(Clone, Copy, Debug)]
pub enum How {
    Like,
    Any,
    Remove,
}

pub fn json_edits(max: usize) -> impl Strategy<Value = Vec<JsonEdit>> {
    let how = prop_oneof![6 => Just(How::Like), 2 => Just(How::Any), 1 => Just(How::Remove)];
    prop::collection::vec((any::<Index>(), any::<Index>(), how), 1..=max)
}

/// Values of the same kind as `v`: what a damaged or hand-edited file is
/// likeliest to hold, and what a reader checks beyond its types.
fn like(v: &Value) -> Vec<Value> {
    match v {
        Value::Number(n) => {
            let mut out = vec![json!(0), json!(1), json!(2), json!(u64::MAX), json!(1u64 << 60), json!(1u64 << 32)];
            if let Some(u) = n.as_u64() {
                out.extend([json!(u + 1), json!(u.saturating_sub(1)), json!(u.saturating_mul(2)), json!(u / 2)]);
            } else if let Some(f) = n.as_f64() {
                out.extend([json!(-f), json!(f * 1e30), json!(-1)]);
            }
            out
        }
        Value::String(s) => vec![json!(""), json!(format!("{s}x")), json!("../x"), json!(s.to_uppercase())],
        Value::Bool(b) => vec![json!(!b)],
        Value::Array(a) => {
            let mut longer = a.clone();
            longer.extend(a.first().cloned());
            let mut shorter = a.clone();
            shorter.pop();
            vec![json!([]), Value::Array(longer), Value::Array(shorter)]
        }
        Value::Object(_) => vec![json!({})],
        Value::Null => vec![json!(0)],
    }
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// Applies the edit to node `n` (pre-order, counting down) under `v`.
fn edit_node(v: &mut Value, n: &mut usize, pick: Index, how: How) -> bool {
    let children: Vec<&mut Value> = match v {
        Value::Array(a) => a.iter_mut().collect(),
        Value::Object(o) => o.values_mut().collect(),
        _ => Vec::new(),
    };
    let mut hit = None;
    for (i, c) in children.into_iter().enumerate() {
        *n -= 1;
        if *n == 0 {
            let values = match how {
                How::Remove => {
                    hit = Some(i);
                    break;
                }
                How::Like => like(c),
                How::Any => edge_values(),
            };
            *c = values[pick.index(values.len())].clone();
            return true;
        }
        if edit_node(c, n, pick, how) {
            return true;
        }
    }
    match (hit, v) {
        (Some(i), Value::Array(a)) => {
            a.remove(i);
            true
        }
        (Some(i), Value::Object(o)) => {
            let key = o.keys().nth(i).cloned();
            key.is_some_and(|k| o.remove(&k).is_some())
        }
        _ => false,
    }
}

pub fn apply_json(v: &mut Value, edits: &[JsonEdit]) {
    for (at, pick, how) in edits {
        let nodes = count(v);
        if nodes < 2 {
            return;
        }
        let mut n = 1 + at.index(nodes - 1);
        edit_node(v, &mut n, *pick, *how);
    }
}
