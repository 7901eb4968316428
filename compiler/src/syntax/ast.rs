//! The syntax tree of a `.tsr` file. Every node that can be named in an error
//! carries its span.

use super::source::Span;

#[derive(Debug, Clone, PartialEq)]
pub struct File {
    pub imports: Vec<(String, Span)>,
    pub constants: Vec<Constant>,
    pub blocks: Vec<BlockDef>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    pub name: String,
    pub value: Expr,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// A reusable block, callable from other blocks.
    Block,
    /// A trunk, selected by `MODEL.TRUNK.NAME`.
    Trunk,
    /// A head, selected by name in `MODEL.HEAD.PARAMS`.
    Head,
    /// A loss, selected by `LOSS.name`.
    Loss,
}

impl BlockKind {
    pub fn keyword(self) -> &'static str {
        match self {
            BlockKind::Block => "block",
            BlockKind::Trunk => "trunk",
            BlockKind::Head => "head",
            BlockKind::Loss => "loss",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockDef {
    pub kind: BlockKind,
    pub name: String,
    pub params: Vec<ParamDecl>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamDecl {
    pub name: String,
    pub ty: TypeExpr,
    pub default: Option<Expr>,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarType {
    Int,
    Float,
    Bool,
    Str,
    Init,
    List,
    Any,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TypeExpr {
    Scalar(ScalarType),
    Tensor(TensorPattern),
}

/// `[B, N, D] f32`: each dim an expression; a bare name that is not bound yet
/// binds to the actual dim, anything else must equal it. `...` matches any
/// number of leading dims.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPattern {
    pub dims: Vec<DimPattern>,
    pub dtype: Option<String>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DimPattern {
    Ellipsis(Span),
    Expr(Expr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StmtKind {
    /// `param name: [dims] = init`
    Param {
        name: String,
        ty: TensorPattern,
        init: Expr,
    },
    /// `buffer name: [dims] = init`
    Buffer {
        name: String,
        ty: TensorPattern,
        init: Expr,
    },
    /// `for var in start..end { }` (end given) or `for var in list { }`.
    For {
        var: String,
        start: Expr,
        end: Option<Expr>,
        body: Vec<Stmt>,
    },
    /// `if cond { } else { }`
    If {
        cond: Expr,
        then: Vec<Stmt>,
        otherwise: Vec<Stmt>,
    },
    Return(Vec<Expr>),
    Assert {
        cond: Expr,
        message: Option<String>,
    },
    /// `expect x: [B, N, D]`: check a value against a pattern, binding new dim names.
    Expect {
        value: Expr,
        pattern: TensorPattern,
    },
    /// `update buf = value`: the buffer's new value after the step.
    Update {
        name: String,
        value: Expr,
    },
    /// `a, b = value`
    Assign {
        targets: Vec<String>,
        value: Expr,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
    /// Levels of nodes from here to the deepest leaf (1 for a leaf). The
    /// parser refuses an expression deeper than its limit, so every walk of
    /// the tree (evaluation, clone, drop) recurses a bounded number of times.
    pub depth: u32,
}

impl Expr {
    /// The depth of a node of this kind over its children (1 for a leaf).
    pub fn depth_of(kind: &ExprKind) -> u32 {
        let d = |e: &Expr| e.depth;
        let opt = |e: &Option<Expr>| e.as_ref().map_or(0, d);
        let items = |xs: &[IndexItem]| {
            xs.iter()
                .map(|i| match i {
                    IndexItem::Expr(e) => d(e),
                    IndexItem::Slice(a, b) => opt(a).max(opt(b)),
                    IndexItem::Ellipsis => 0,
                })
                .max()
                .unwrap_or(0)
        };
        let below = match kind {
            ExprKind::Int(_)
            | ExprKind::Float(_)
            | ExprKind::Str(_)
            | ExprKind::Bool(_)
            | ExprKind::None
            | ExprKind::Name(_) => 0,
            ExprKind::List(xs) => xs.iter().map(d).max().unwrap_or(0),
            ExprKind::Unary(_, x) | ExprKind::Field(x, _) => d(x),
            ExprKind::Binary(_, a, b) => d(a).max(d(b)),
            ExprKind::Cond(a, b, c) => d(a).max(d(b)).max(d(c)),
            ExprKind::Index(x, ix) => d(x).max(items(ix)),
            ExprKind::Call { args, scope, .. } => {
                let a = args.iter().map(|a| d(&a.value)).max().unwrap_or(0);
                let s = scope
                    .iter()
                    .flatten()
                    .map(|s| match s {
                        ScopeSeg::Name(_) => 0,
                        ScopeSeg::Index(e) => d(e),
                    })
                    .max()
                    .unwrap_or(0);
                a.max(s)
            }
        };
        below.saturating_add(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    FloorDiv,
    Rem,
    MatMul,
    Pow,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Or => "or",
            BinOp::And => "and",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::FloorDiv => "//",
            BinOp::Rem => "%",
            BinOp::MatMul => "@",
            BinOp::Pow => "**",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IndexItem {
    Expr(Expr),
    Slice(Option<Expr>, Option<Expr>),
    Ellipsis,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ScopeSeg {
    Name(String),
    Index(Expr),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    pub name: Option<String>,
    pub value: Expr,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    None,
    Name(String),
    List(Vec<Expr>),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `if c then a else b`
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    Field(Box<Expr>, String),
    Index(Box<Expr>, Vec<IndexItem>),
    /// `name(args) [as scope]`
    Call {
        callee: String,
        args: Vec<Arg>,
        scope: Option<Vec<ScopeSeg>>,
    },
}
