//! pest parse tree -> AST. Parsing never panics: malformed input, deep nesting
//! and out-of-range literals all come back as a `Diagnostic`.

use super::ast::*;
use super::source::{Diagnostic, FileId, SourceMap, Span};
use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser;
use std::sync::OnceLock;

#[derive(pest_derive::Parser)]
#[grammar = "../../grammar/tessera.pest"]
struct TsrParser;

/// Limits that keep the recursive-descent parser and the elaborator within a
/// small stack on adversarial input (see `check_nesting`).
const MAX_FILE_BYTES: usize = 1 << 20;
const MAX_BRACKET_DEPTH: usize = 128;
const MAX_PREFIX_RUN: usize = 64;
const MAX_CHAINED: usize = 2000;
/// The deepest expression tree the parser builds (`Expr::depth`). Chains of
/// left-associative operators (`1 + 1 + ...`), indexing (`x[0][0]...`) and
/// field accesses (`cfg.A.A...`) parse in a loop, so the pre-scan does not
/// see them; this bound is checked as each node is built, before anything
/// (evaluation, clone, drop) walks the tree recursively.
pub const MAX_EXPR_DEPTH: u32 = 256;
/// The deepest nesting of statements (`if`/`else if`/`for` bodies).
pub const MAX_STMT_DEPTH: u32 = 256;

fn pratt() -> &'static PrattParser<Rule> {
    static PRATT: OnceLock<PrattParser<Rule>> = OnceLock::new();
    PRATT.get_or_init(|| {
        PrattParser::new()
            .op(Op::infix(Rule::or, Assoc::Left))
            .op(Op::infix(Rule::and, Assoc::Left))
            .op(Op::prefix(Rule::not))
            .op(Op::infix(Rule::eq, Assoc::Left)
                | Op::infix(Rule::ne, Assoc::Left)
                | Op::infix(Rule::lt, Assoc::Left)
                | Op::infix(Rule::le, Assoc::Left)
                | Op::infix(Rule::gt, Assoc::Left)
                | Op::infix(Rule::ge, Assoc::Left))
            .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
            .op(Op::infix(Rule::mul, Assoc::Left)
                | Op::infix(Rule::div, Assoc::Left)
                | Op::infix(Rule::floordiv, Assoc::Left)
                | Op::infix(Rule::rem, Assoc::Left)
                | Op::infix(Rule::matmul, Assoc::Left))
            .op(Op::prefix(Rule::neg))
            .op(Op::infix(Rule::pow, Assoc::Right))
    })
}

/// Parses one file of `map`.
pub fn parse_file(map: &SourceMap, file: FileId) -> Result<File, Diagnostic> {
    let text = &map.file(file).text;
    check_nesting(map, file, text)?;
    let mut pairs = TsrParser::parse(Rule::file, text).map_err(|e| pest_error(map, file, e))?;
    let root = pairs.next().ok_or_else(|| map.diagnostic(Span { file, start: 0, end: 0 }, "empty parse"))?;
    let b = Builder { map, file, nest: std::cell::Cell::new(0) };
    b.file(root)
}

/// Rejects inputs whose nesting would make the recursive parser or the
/// elaborator recurse too deeply, with an error at the offending spot.
fn check_nesting(map: &SourceMap, file: FileId, text: &str) -> Result<(), Diagnostic> {
    let at = |i: usize, msg: String| map.diagnostic(Span { file, start: i as u32, end: i as u32 + 1 }, msg);
    if text.len() > MAX_FILE_BYTES {
        return Err(at(0, format!("file is larger than {MAX_FILE_BYTES} bytes")));
    }
    let bytes = text.as_bytes();
    let (mut depth, mut prefix_run, mut chained) = (0usize, 0usize, 0usize);
    let mut i = 0;
    let mut prev_significant = b'(';
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_BRACKET_DEPTH {
                    return Err(at(i, format!("brackets nested more than {MAX_BRACKET_DEPTH} deep")));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if !c.is_ascii_whitespace() {
            // A '-' after an operator or opening bracket is a prefix minus.
            let is_prefix = c == b'-' && b"(,[=+-*/%@<>!:".contains(&prev_significant);
            let word = if c.is_ascii_alphabetic() {
                let end = bytes[i..]
                    .iter()
                    .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
                    .map_or(bytes.len(), |p| i + p);
                &text[i..end]
            } else {
                ""
            };
            if is_prefix || word == "not" {
                prefix_run += 1;
                if prefix_run > MAX_PREFIX_RUN {
                    return Err(at(i, format!("more than {MAX_PREFIX_RUN} prefix operators in a row")));
                }
            } else {
                prefix_run = 0;
            }
            if word == "then" || word == "else" || (c == b'*' && bytes.get(i + 1) == Some(&b'*')) {
                chained += 1;
                if chained > MAX_CHAINED {
                    return Err(at(i, format!("more than {MAX_CHAINED} chained `then`/`else`/`**` in one file")));
                }
            }
            prev_significant = if word.is_empty() { c } else { b'a' };
            if word == "not" {
                prev_significant = b'!';
            }
            if !word.is_empty() {
                i += word.len();
                continue;
            }
        }
        i += 1;
    }
    Ok(())
}

fn pest_error(map: &SourceMap, file: FileId, e: pest::error::Error<Rule>) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let (start, end) = match e.location {
        InputLocation::Pos(p) => (p, p),
        InputLocation::Span((s, e)) => (s, e),
    };
    let message = match &e.variant {
        ErrorVariant::ParsingError { positives, negatives } => expected_message(positives, negatives),
        ErrorVariant::CustomError { message } => message.clone(),
    };
    map.diagnostic(Span { file, start: start as u32, end: end.max(start + 1) as u32 }, message)
}

/// "expected one of: an expression, `)`" from pest's rule lists, in words.
fn expected_message(positives: &[Rule], negatives: &[Rule]) -> String {
    let mut names: Vec<&str> = positives.iter().filter_map(|r| rule_name(*r)).collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        if negatives.is_empty() {
            return "unexpected input".to_string();
        }
        let n: Vec<&str> = negatives.iter().filter_map(|r| rule_name(*r)).collect();
        return format!("unexpected {}", n.join(" or "));
    }
    match names.as_slice() {
        [one] => format!("expected {one}"),
        many => format!("expected one of: {}", many.join(", ")),
    }
}

fn rule_name(r: Rule) -> Option<&'static str> {
    Some(match r {
        Rule::EOI => "end of file",
        Rule::import | Rule::constant | Rule::block_def | Rule::block_kind => {
            "`import`, `let`, `block`, `trunk`, `head` or `loss`"
        }
        Rule::ident => "a name",
        Rule::keyword => "a keyword",
        Rule::param_list | Rule::param_decl => "a parameter",
        Rule::scalar_type | Rule::tensor_type => {
            "a type (`int`, `float`, `bool`, `str`, `init`, `list`, `any` or `[dims]`)"
        }
        Rule::dim_pat => "a dimension",
        Rule::dtype => "a dtype",
        Rule::body => "`{`",
        Rule::param_stmt
        | Rule::buffer_stmt
        | Rule::for_stmt
        | Rule::if_stmt
        | Rule::return_stmt
        | Rule::assert_stmt
        | Rule::expect_stmt
        | Rule::update_stmt
        | Rule::assign_stmt => "a statement",
        Rule::expr | Rule::cond_expr | Rule::binary | Rule::postfix_expr | Rule::call | Rule::list | Rule::paren => {
            "an expression"
        }
        Rule::number => "a number",
        Rule::string => "a string",
        Rule::boolean => "`true` or `false`",
        Rule::none => "`none`",
        Rule::range_end => "`..`",
        Rule::or | Rule::and | Rule::eq | Rule::ne | Rule::le | Rule::ge | Rule::lt | Rule::gt => "an operator",
        Rule::add | Rule::sub | Rule::mul | Rule::div | Rule::floordiv | Rule::rem | Rule::matmul | Rule::pow => {
            "an operator"
        }
        Rule::neg | Rule::not => "an expression",
        Rule::field | Rule::index | Rule::index_item | Rule::slice | Rule::ellipsis => "an index or field",
        Rule::scope | Rule::scope_path | Rule::scope_index | Rule::scope_field => "a scope (`as name`)",
        Rule::arg => "an argument",
        _ => return None,
    })
}

struct Builder<'a> {
    map: &'a SourceMap,
    file: FileId,
    /// Statements open around the one being built (see `MAX_STMT_DEPTH`).
    nest: std::cell::Cell<u32>,
}

type R<T> = Result<T, Diagnostic>;

impl<'a> Builder<'a> {
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span { file: self.file, start: s.start() as u32, end: s.end() as u32 }
    }

    fn err<T>(&self, p: &Pair<Rule>, msg: impl Into<String>) -> R<T> {
        Err(self.map.diagnostic(self.span(p), msg))
    }

    /// An expression node, refused when the tree under it would be deeper
    /// than `MAX_EXPR_DEPTH`.
    fn node(&self, kind: ExprKind, span: Span) -> R<Expr> {
        let depth = Expr::depth_of(&kind);
        if depth > MAX_EXPR_DEPTH {
            return Err(self.map.diagnostic(
                span,
                format!(
                    "expression nested more than {MAX_EXPR_DEPTH} deep (a chain of operators, calls, indexing `x[0][0]...` or field accesses `a.b.c...`); split it into several statements"
                ),
            ));
        }
        Ok(Expr { kind, span, depth })
    }

    fn file(&self, root: Pair<Rule>) -> R<File> {
        let mut f = File { imports: Vec::new(), constants: Vec::new(), blocks: Vec::new() };
        for p in root.into_inner().filter(not_kw) {
            match p.as_rule() {
                Rule::import => {
                    let span = self.span(&p);
                    let s = p.into_inner().find(not_kw).expect("grammar: import has a string");
                    f.imports.push((self.string(&s)?, span));
                }
                Rule::constant => {
                    let span = self.span(&p);
                    let mut it = p.into_inner().filter(not_kw);
                    let name = it.next().expect("grammar: name").as_str().to_string();
                    let value = self.expr(it.next().expect("grammar: value"))?;
                    f.constants.push(Constant { name, value, span });
                }
                Rule::block_def => f.blocks.push(self.block_def(p)?),
                Rule::EOI => {}
                r => return self.err(&p, format!("unexpected {r:?}")),
            }
        }
        Ok(f)
    }

    fn block_def(&self, p: Pair<Rule>) -> R<BlockDef> {
        let span = self.span(&p);
        let mut it = p.into_inner().filter(not_kw);
        let kind = match it.next().expect("grammar: kind").as_str() {
            "trunk" => BlockKind::Trunk,
            "head" => BlockKind::Head,
            "loss" => BlockKind::Loss,
            _ => BlockKind::Block,
        };
        let name = it.next().expect("grammar: name").as_str().to_string();
        let mut params = Vec::new();
        for d in it.next().expect("grammar: params").into_inner().filter(not_kw) {
            let dspan = self.span(&d);
            let mut di = d.into_inner().filter(not_kw);
            let pname = di.next().expect("grammar: name").as_str().to_string();
            let ty = self.type_expr(di.next().expect("grammar: type"))?;
            let default = di.next().map(|e| self.expr(e)).transpose()?;
            params.push(ParamDecl { name: pname, ty, default, span: dspan });
        }
        let body = self.body(it.next().expect("grammar: body"))?;
        Ok(BlockDef { kind, name, params, body, span })
    }

    fn type_expr(&self, p: Pair<Rule>) -> R<TypeExpr> {
        Ok(match p.as_rule() {
            Rule::scalar_type => TypeExpr::Scalar(match p.as_str() {
                "int" => ScalarType::Int,
                "float" => ScalarType::Float,
                "bool" => ScalarType::Bool,
                "str" => ScalarType::Str,
                "init" => ScalarType::Init,
                "list" => ScalarType::List,
                _ => ScalarType::Any,
            }),
            _ => TypeExpr::Tensor(self.tensor_type(p)?),
        })
    }

    fn tensor_type(&self, p: Pair<Rule>) -> R<TensorPattern> {
        let span = self.span(&p);
        let mut dims = Vec::new();
        let mut dtype = None;
        for d in p.into_inner().filter(not_kw) {
            match d.as_rule() {
                Rule::dim_pat => {
                    let inner = d.into_inner().find(not_kw).expect("grammar: dim");
                    dims.push(match inner.as_rule() {
                        Rule::ellipsis => DimPattern::Ellipsis(self.span(&inner)),
                        _ => DimPattern::Expr(self.expr(inner)?),
                    });
                }
                _ => dtype = Some(d.as_str().to_string()),
            }
        }
        Ok(TensorPattern { dims, dtype, span })
    }

    fn body(&self, p: Pair<Rule>) -> R<Vec<Stmt>> {
        p.into_inner().filter(not_kw).map(|s| self.stmt(s)).collect()
    }

    fn stmt(&self, p: Pair<Rule>) -> R<Stmt> {
        let depth = self.nest.get() + 1;
        if depth > MAX_STMT_DEPTH {
            return self.err(
                &p,
                format!(
                    "statements nested more than {MAX_STMT_DEPTH} deep (`if`, `else if` and `for` inside one another)"
                ),
            );
        }
        self.nest.set(depth);
        let s = self.stmt_inner(p);
        self.nest.set(depth - 1);
        s
    }

    fn stmt_inner(&self, p: Pair<Rule>) -> R<Stmt> {
        let span = self.span(&p);
        let rule = p.as_rule();
        let mut it = p.into_inner().filter(not_kw);
        let mut next = || it.next().expect("grammar: statement part");
        let kind = match rule {
            Rule::param_stmt | Rule::buffer_stmt => {
                let name = next().as_str().to_string();
                let ty = self.tensor_type(next())?;
                let init = self.expr(next())?;
                if rule == Rule::param_stmt {
                    StmtKind::Param { name, ty, init }
                } else {
                    StmtKind::Buffer { name, ty, init }
                }
            }
            Rule::for_stmt => {
                let var = next().as_str().to_string();
                let start = self.expr(next())?;
                let mut end = None;
                let mut body = None;
                for rest in it {
                    match rest.as_rule() {
                        Rule::range_end => {
                            end = Some(self.expr(rest.into_inner().find(not_kw).expect("grammar: end"))?)
                        }
                        _ => body = Some(self.body(rest)?),
                    }
                }
                StmtKind::For { var, start, end, body: body.unwrap_or_default() }
            }
            Rule::if_stmt => {
                let cond = self.expr(next())?;
                let then = self.body(next())?;
                let otherwise = match it.next() {
                    None => Vec::new(),
                    Some(e) if e.as_rule() == Rule::if_stmt => vec![self.stmt(e)?],
                    Some(e) => self.body(e)?,
                };
                StmtKind::If { cond, then, otherwise }
            }
            Rule::return_stmt => StmtKind::Return(it.map(|e| self.expr(e)).collect::<R<_>>()?),
            Rule::assert_stmt => {
                let cond = self.expr(next())?;
                let message = it.next().map(|s| self.string(&s)).transpose()?;
                StmtKind::Assert { cond, message }
            }
            Rule::expect_stmt => {
                let value = self.expr(next())?;
                let pattern = self.tensor_type(next())?;
                StmtKind::Expect { value, pattern }
            }
            Rule::update_stmt => {
                let name = next().as_str().to_string();
                StmtKind::Update { name, value: self.expr(next())? }
            }
            Rule::assign_stmt => {
                let parts: Vec<Pair<Rule>> = it.collect();
                let (last, names) = parts.split_last().expect("grammar: assignment has a value");
                let targets = names.iter().map(|n| n.as_str().to_string()).collect();
                StmtKind::Assign { targets, value: self.expr(last.clone())? }
            }
            r => unreachable!("grammar: statement rule {r:?}"),
        };
        Ok(Stmt { kind, span })
    }

    fn expr(&self, p: Pair<Rule>) -> R<Expr> {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::expr => self.expr(p.into_inner().find(not_kw).expect("grammar: expr")),
            Rule::cond_expr => {
                let mut it = p.into_inner().filter(not_kw);
                let c = self.expr(it.next().expect("grammar: cond"))?;
                let a = self.expr(it.next().expect("grammar: then"))?;
                let b = self.expr(it.next().expect("grammar: else"))?;
                self.node(ExprKind::Cond(Box::new(c), Box::new(a), Box::new(b)), span)
            }
            Rule::binary => self.binary(p),
            _ => self.postfix_expr(p),
        }
    }

    fn binary(&self, p: Pair<Rule>) -> R<Expr> {
        pratt()
            .map_primary(|prim| self.postfix_expr(prim))
            .map_prefix(|op, rhs| {
                let rhs = rhs?;
                let span = join(&self.span(&op), &rhs.span);
                let u = if op.as_rule() == Rule::neg { UnOp::Neg } else { UnOp::Not };
                self.node(ExprKind::Unary(u, Box::new(rhs)), span)
            })
            .map_infix(|lhs, op, rhs| {
                let (lhs, rhs) = (lhs?, rhs?);
                let b = match op.as_rule() {
                    Rule::or => BinOp::Or,
                    Rule::and => BinOp::And,
                    Rule::eq => BinOp::Eq,
                    Rule::ne => BinOp::Ne,
                    Rule::lt => BinOp::Lt,
                    Rule::le => BinOp::Le,
                    Rule::gt => BinOp::Gt,
                    Rule::ge => BinOp::Ge,
                    Rule::add => BinOp::Add,
                    Rule::sub => BinOp::Sub,
                    Rule::mul => BinOp::Mul,
                    Rule::div => BinOp::Div,
                    Rule::floordiv => BinOp::FloorDiv,
                    Rule::rem => BinOp::Rem,
                    Rule::matmul => BinOp::MatMul,
                    _ => BinOp::Pow,
                };
                let span = join(&lhs.span, &rhs.span);
                self.node(ExprKind::Binary(b, Box::new(lhs), Box::new(rhs)), span)
            })
            .parse(p.into_inner().filter(not_kw))
    }

    fn postfix_expr(&self, p: Pair<Rule>) -> R<Expr> {
        let mut it = p.into_inner().filter(not_kw);
        let mut e = self.primary(it.next().expect("grammar: primary"))?;
        for post in it {
            let span = Span { file: self.file, start: e.span.start, end: self.span(&post).end };
            let kind = match post.as_rule() {
                Rule::field => {
                    let name = post.into_inner().find(not_kw).expect("grammar: field").as_str().to_string();
                    ExprKind::Field(Box::new(e), name)
                }
                Rule::index => {
                    let items = post.into_inner().filter(not_kw).map(|i| self.index_item(i)).collect::<R<_>>()?;
                    ExprKind::Index(Box::new(e), items)
                }
                Rule::scope => {
                    let path = post.into_inner().find(not_kw).expect("grammar: scope path");
                    let mut segs = Vec::new();
                    for s in path.into_inner().filter(not_kw) {
                        match s.as_rule() {
                            Rule::ident => segs.push(ScopeSeg::Name(s.as_str().to_string())),
                            Rule::scope_field => segs.push(ScopeSeg::Name(
                                s.into_inner().find(not_kw).expect("grammar: field").as_str().to_string(),
                            )),
                            _ => segs.push(ScopeSeg::Index(
                                self.expr(s.into_inner().find(not_kw).expect("grammar: index"))?,
                            )),
                        }
                    }
                    match e.kind {
                        ExprKind::Call { callee, args, scope: None } => {
                            ExprKind::Call { callee, args, scope: Some(segs) }
                        }
                        _ => {
                            return Err(self
                                .map
                                .diagnostic(span, "`as name` can only follow a call, e.g. `Linear(x, 10) as fc1`"))
                        }
                    }
                }
                r => unreachable!("grammar: postfix {r:?}"),
            };
            e = self.node(kind, span)?;
        }
        Ok(e)
    }

    fn index_item(&self, p: Pair<Rule>) -> R<IndexItem> {
        let inner = p.into_inner().find(not_kw).expect("grammar: index item");
        Ok(match inner.as_rule() {
            Rule::ellipsis => IndexItem::Ellipsis,
            Rule::slice => {
                let text = inner.as_str();
                let colon = text.find(':').unwrap_or(0);
                let base = inner.as_span().start();
                let mut lo = None;
                let mut hi = None;
                for e in inner.into_inner().filter(not_kw) {
                    if e.as_span().start() - base < colon {
                        lo = Some(self.expr(e)?);
                    } else {
                        hi = Some(self.expr(e)?);
                    }
                }
                IndexItem::Slice(lo, hi)
            }
            _ => IndexItem::Expr(self.expr(inner)?),
        })
    }

    fn primary(&self, p: Pair<Rule>) -> R<Expr> {
        let span = self.span(&p);
        let kind = match p.as_rule() {
            Rule::number => {
                let s = p.as_str();
                if s.contains(['.', 'e', 'E']) {
                    match s.parse::<f64>() {
                        Ok(v) if v.is_finite() => ExprKind::Float(v),
                        _ => return self.err(&p, format!("number `{s}` is out of range")),
                    }
                } else {
                    match s.parse::<i64>() {
                        Ok(v) => ExprKind::Int(v),
                        Err(_) => return self.err(&p, format!("integer `{s}` is out of range")),
                    }
                }
            }
            Rule::string => ExprKind::Str(self.string(&p)?),
            Rule::boolean => ExprKind::Bool(p.as_str() == "true"),
            Rule::none => ExprKind::None,
            Rule::ident => ExprKind::Name(p.as_str().to_string()),
            Rule::paren => return self.expr(p.into_inner().find(not_kw).expect("grammar: paren")),
            Rule::list => ExprKind::List(p.into_inner().filter(not_kw).map(|e| self.expr(e)).collect::<R<_>>()?),
            Rule::call => {
                let mut it = p.into_inner().filter(not_kw);
                let callee = it.next().expect("grammar: callee").as_str().to_string();
                let mut args = Vec::new();
                for a in it {
                    let parts: Vec<Pair<Rule>> = a.into_inner().filter(not_kw).collect();
                    match parts.as_slice() {
                        [name, value] => {
                            args.push(Arg { name: Some(name.as_str().to_string()), value: self.expr(value.clone())? })
                        }
                        [value] => args.push(Arg { name: None, value: self.expr(value.clone())? }),
                        _ => unreachable!("grammar: argument"),
                    }
                }
                ExprKind::Call { callee, args, scope: None }
            }
            _ => return self.expr(p),
        };
        self.node(kind, span)
    }

    fn string(&self, p: &Pair<Rule>) -> R<String> {
        let raw = p.as_str();
        let inner = &raw[1..raw.len() - 1];
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some(o) => return self.err(p, format!("unknown escape `\\{o}` in string")),
                None => return self.err(p, "string ends with a backslash"),
            }
        }
        Ok(out)
    }
}

fn join(a: &Span, b: &Span) -> Span {
    Span { file: a.file, start: a.start.min(b.start), end: a.end.max(b.end) }
}

/// Keyword tokens carry no information for the tree.
fn not_kw(p: &Pair<Rule>) -> bool {
    !matches!(
        p.as_rule(),
        Rule::kw_import
            | Rule::kw_let
            | Rule::kw_param
            | Rule::kw_buffer
            | Rule::kw_for
            | Rule::kw_in
            | Rule::kw_if
            | Rule::kw_then
            | Rule::kw_else
            | Rule::kw_return
            | Rule::kw_assert
            | Rule::kw_expect
            | Rule::kw_update
            | Rule::kw_as
    )
}
