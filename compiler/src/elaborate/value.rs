//! Values of the elaborator: compile-time scalars, lists, config references and
//! IR tensors. A value read from the experiment config remembers its key, so
//! that a failed check names the config keys involved.

use crate::ir::{DType, Dim, Init, ValueId};
use std::fmt;
use std::rc::Rc;

#[derive(Clone, Debug)]
pub enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    /// A batch-dependent dimension (`k * B`).
    Dim(Dim),
    List(Rc<Vec<Val>>),
    Tensor(ValueId),
    Init(Init),
    DType(DType),
    /// A map in the experiment config, by dotted path ("" is the root `cfg`).
    Cfg(Rc<str>),
}

#[derive(Clone, Debug)]
pub struct Val {
    pub v: V,
    /// The config key this value was read from, if any.
    pub origin: Option<Rc<str>>,
    /// Lists inside lists down to the deepest item (0 for a scalar): the
    /// elaborator refuses values nested deeper than `MAX_VALUE_NESTING`, so
    /// dropping or printing one recurses a bounded number of times.
    pub nest: u32,
}

/// The deepest nesting of lists a value may have (see `Val::nest`).
pub const MAX_VALUE_NESTING: u32 = 64;

fn nest_of(v: &V) -> u32 {
    match v {
        V::List(items) => items.iter().map(|i| i.nest).max().unwrap_or(0).saturating_add(1),
        _ => 0,
    }
}

impl Val {
    pub fn new(v: V) -> Self {
        let nest = nest_of(&v);
        Val { v, origin: None, nest }
    }
    pub fn from_config(v: V, key: &str) -> Self {
        let nest = nest_of(&v);
        Val { v, origin: Some(Rc::from(key)), nest }
    }
    pub fn int(i: i64) -> Self {
        Val::new(V::Int(i))
    }
    pub fn list(items: Vec<Val>) -> Self {
        Val::new(V::List(Rc::new(items)))
    }

    pub fn type_name(&self) -> &'static str {
        match self.v {
            V::None => "none",
            V::Bool(_) => "bool",
            V::Int(_) => "int",
            V::Float(_) => "float",
            V::Str(_) => "str",
            V::Dim(_) => "dim",
            V::List(_) => "list",
            V::Tensor(_) => "tensor",
            V::Init(_) => "init",
            V::DType(_) => "dtype",
            V::Cfg(_) => "config section",
        }
    }

    /// A dimension value (an int or a batch-dependent dim).
    pub fn as_dim(&self) -> Option<Dim> {
        match self.v {
            V::Int(i) if i >= 0 => Some(Dim::Const(i as u64)),
            V::Dim(d) => Some(d),
            _ => None,
        }
    }

    pub fn from_dim(d: Dim) -> Val {
        match d {
            Dim::Const(n) => Val::int(n as i64),
            b => Val::new(V::Dim(b)),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self.v {
            V::Int(i) => Some(i as f64),
            V::Float(f) => Some(f),
            _ => None,
        }
    }

    /// "768 (config MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM)" for notes.
    pub fn describe(&self) -> String {
        match &self.origin {
            Some(k) => format!("{self} (config `{k}`)"),
            None => self.to_string(),
        }
    }
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.v {
            V::None => write!(f, "none"),
            V::Bool(b) => write!(f, "{b}"),
            V::Int(i) => write!(f, "{i}"),
            V::Float(x) => write!(f, "{x}"),
            V::Str(s) => write!(f, "\"{s}\""),
            V::Dim(d) => write!(f, "{d}"),
            V::List(items) => {
                write!(f, "[")?;
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{it}")?;
                }
                write!(f, "]")
            }
            V::Tensor(id) => write!(f, "tensor %{}", id.index()),
            V::Init(i) => write!(f, "{i}"),
            V::DType(d) => write!(f, "{d}"),
            V::Cfg(p) => write!(f, "cfg.{p}"),
        }
    }
}

/// Converts a config value to an elaborator value; maps stay references.
pub fn from_json(j: &serde_json::Value, key: &str) -> Val {
    use serde_json::Value as J;
    let v = match j {
        J::Null => V::None,
        J::Bool(b) => V::Bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => V::Int(i),
            None => V::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => V::Str(Rc::from(s.as_str())),
        J::Array(items) => V::List(Rc::new(
            items.iter().enumerate().map(|(i, it)| from_json(it, &join_key(key, &i.to_string()))).collect(),
        )),
        J::Object(_) => V::Cfg(Rc::from(key)),
    };
    Val::from_config(v, key)
}

pub fn join_key(base: &str, seg: &str) -> String {
    if base.is_empty() {
        seg.to_string()
    } else {
        format!("{base}.{seg}")
    }
}

/// Looks up a dotted path in a JSON tree (numeric segments index lists).
pub fn json_get<'a>(root: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    if path.is_empty() {
        return Some(root);
    }
    path.split('.').try_fold(root, |node, seg| match node {
        serde_json::Value::Object(m) => m.get(seg),
        serde_json::Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}
