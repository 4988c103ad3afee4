//! `-o jsonpath=TEMPLATE`: kubectl's JSONPath templates, the part people use.
//!
//! Text outside braces is printed as it is; inside braces:
//! - a path from the current object: `{.metadata.name}`, `{.items[*].id}`,
//!   `{.items[0].node}`, `{.items[-1].id}`, `{.labels['app']}`, `{.items[*].*}`,
//!   filters `{.items[?(@.phase=="Running")].id}` (`==`, `!=`; a string, number,
//!   `true`, `false` or `null`);
//! - `{range PATH}…{end}`: the inside once per value, paths relative to it;
//! - a quoted string: `{"\n"}`, `{"\t"}`.
//!
//! Several values of one path are joined by a space, strings print bare and other
//! values as compact JSON; a path that finds nothing prints nothing (kubectl's default,
//! `--allow-missing-template-keys`). As kubectl does, a list is the object
//! `{"kind": "List", "items": [...]}`.

use std::fmt;

use serde_json::Value;

/// A template that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid jsonpath template {template:?}: {reason}")]
pub struct BadTemplate {
    /// As given.
    pub template: String,
    /// What is wrong.
    pub reason: String,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Path(Path),
    Range(Path, Vec<Node>),
}

#[derive(Debug, Clone, PartialEq)]
struct Path(Vec<Step>);

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    All,
    Index(i64),
    Filter {
        path: Path,
        equal: bool,
        value: Value,
    },
}

impl std::str::FromStr for Template {
    type Err = BadTemplate;
    fn from_str(s: &str) -> Result<Template, BadTemplate> {
        parse(s).map_err(|reason| BadTemplate {
            template: s.to_string(),
            reason,
        })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.nodes)
    }
}

fn parse(s: &str) -> Result<Template, String> {
    // Frames of nodes being built: the outermost, then one per open `range`.
    let mut frames: Vec<(Option<Path>, Vec<Node>)> = vec![(None, Vec::new())];
    let mut rest = s;
    while !rest.is_empty() {
        let Some(open) = rest.find('{') else {
            push_text(&mut frames, rest);
            break;
        };
        push_text(&mut frames, &rest[..open]);
        let close = closing_brace(&rest[open..])
            .ok_or_else(|| format!("unclosed '{{' at {:?}", &rest[open..]))?;
        let inner = rest[open + 1..open + close].trim();
        rest = &rest[open + close + 1..];
        let top = &mut frames.last_mut().expect("the outermost frame stays").1;
        if inner == "end" {
            let (Some(path), nodes) = frames.pop().expect("a frame") else {
                return Err("{end} without {range}".into());
            };
            frames
                .last_mut()
                .expect("the outermost frame stays")
                .1
                .push(Node::Range(path, nodes));
        } else if let Some(p) = inner.strip_prefix("range ") {
            let path = parse_path(p.trim())?;
            frames.push((Some(path), Vec::new()));
        } else if inner.starts_with('"') {
            top.push(Node::Text(unquote(inner)?));
        } else {
            top.push(Node::Path(parse_path(inner)?));
        }
    }
    if frames.len() > 1 {
        return Err("{range} without {end}".into());
    }
    Ok(Template {
        nodes: frames.pop().map(|f| f.1).unwrap_or_default(),
    })
}

fn push_text(frames: &mut [(Option<Path>, Vec<Node>)], text: &str) {
    if !text.is_empty() {
        if let Some(f) = frames.last_mut() {
            f.1.push(Node::Text(text.to_string()));
        }
    }
}

/// The index of the `}` closing the `{` at 0, skipping quoted strings.
fn closing_brace(s: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '}' => return Some(i),
            None => {}
        }
    }
    None
}

fn unquote(s: &str) -> Result<String, String> {
    let q = s.chars().next().unwrap_or('"');
    let body = s
        .strip_prefix(q)
        .and_then(|b| b.strip_suffix(q))
        .ok_or_else(|| format!("unterminated string {s}"))?;
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(c @ ('\\' | '"' | '\'')) => out.push(c),
            Some(c) => return Err(format!("unknown escape \\{c} in {s}")),
            None => return Err(format!("a lone backslash ends {s}")),
        }
    }
    Ok(out)
}

fn parse_path(s: &str) -> Result<Path, String> {
    let s = s.strip_prefix('$').unwrap_or(s);
    let s = s.strip_prefix('@').unwrap_or(s);
    let mut steps = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let name = &r[..end];
            match name {
                "" if r.starts_with('[') => {}
                "" => return Err(format!("an empty field name in {s:?}")),
                "*" => steps.push(Step::All),
                n => steps.push(Step::Field(n.to_string())),
            }
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let close = bracket_end(r).ok_or_else(|| format!("unclosed '[' in {s:?}"))?;
            steps.push(parse_bracket(r[..close].trim(), s)?);
            rest = &r[close + 1..];
        } else {
            return Err(format!(
                "expected '.' or '[' at {rest:?} in {s:?} (paths start with a dot: {{.items}})"
            ));
        }
    }
    Ok(Path(steps))
}

/// The index of the `]` closing a bracket whose content starts `r`.
fn bracket_end(r: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for (i, c) in r.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '(' => depth += 1,
            None if c == ')' => depth = depth.saturating_sub(1),
            None if c == ']' && depth == 0 => return Some(i),
            None => {}
        }
    }
    None
}

fn parse_bracket(inner: &str, whole: &str) -> Result<Step, String> {
    if inner == "*" {
        return Ok(Step::All);
    }
    if inner.starts_with('\'') || inner.starts_with('"') {
        return Ok(Step::Field(unquote(inner)?));
    }
    if let Some(f) = inner.strip_prefix("?(").and_then(|f| f.strip_suffix(')')) {
        let (lhs, equal, rhs) = if let Some((l, r)) = f.split_once("==") {
            (l, true, r)
        } else if let Some((l, r)) = f.split_once("!=") {
            (l, false, r)
        } else {
            return Err(format!(
                "a filter compares with == or != in {whole:?}: [?(@.phase==\"Running\")]"
            ));
        };
        let lhs = lhs.trim();
        if !lhs.starts_with('@') {
            return Err(format!("a filter starts with @ in {whole:?}"));
        }
        let rhs = rhs.trim();
        let value = if rhs.starts_with('"') || rhs.starts_with('\'') {
            Value::String(unquote(rhs)?)
        } else {
            serde_json::from_str(rhs)
                .map_err(|_| format!("cannot compare with {rhs:?} in {whole:?}"))?
        };
        return Ok(Step::Filter {
            path: parse_path(lhs)?,
            equal,
            value,
        });
    }
    inner.parse::<i64>().map(Step::Index).map_err(|_| {
        format!("expected *, an index, a quoted key or a filter in [{inner}] of {whole:?}")
    })
}

fn select<'a>(path: &Path, root: &'a Value) -> Vec<&'a Value> {
    let mut cur = vec![root];
    for step in &path.0 {
        let mut next = Vec::new();
        for v in cur {
            match (step, v) {
                (Step::Field(n), Value::Object(m)) => next.extend(m.get(n)),
                (Step::All, Value::Object(m)) => next.extend(m.values()),
                (Step::All, Value::Array(a)) => next.extend(a),
                (Step::Index(i), Value::Array(a)) => {
                    let len = i64::try_from(a.len()).unwrap_or(i64::MAX);
                    let at = if *i < 0 { len + i } else { *i };
                    next.extend(usize::try_from(at).ok().and_then(|at| a.get(at)));
                }
                (Step::Filter { path, equal, value }, Value::Array(a)) => {
                    next.extend(a.iter().filter(|item| {
                        let found = select(path, item);
                        found.contains(&value) == *equal
                    }))
                }
                _ => {}
            }
        }
        cur = next;
    }
    cur
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl Template {
    /// The template applied to `v`.
    pub fn render(&self, v: &Value) -> String {
        let mut out = String::new();
        render(&self.nodes, v, &mut out);
        out
    }
}

fn render(nodes: &[Node], v: &Value, out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Path(p) => {
                let shown: Vec<String> = select(p, v).into_iter().map(show).collect();
                out.push_str(&shown.join(" "));
            }
            Node::Range(p, inner) => {
                for item in select(p, v) {
                    // A range over one array goes through its items.
                    match item {
                        Value::Array(a) if p.0.last().is_some_and(|s| !matches!(s, Step::All)) => {
                            for x in a {
                                render(inner, x, out);
                            }
                        }
                        x => render(inner, x, out),
                    }
                }
            }
        }
    }
}

/// Objects as kubectl hands them to a template: one as it is, several as a List.
pub fn list(items: Vec<Value>) -> Value {
    serde_json::json!({"kind": "List", "items": items})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(t: &str, v: &Value) -> String {
        t.parse::<Template>().expect("valid template").render(v)
    }

    fn tasks() -> Value {
        list(vec![
            json!({"id": "web-1", "phase": "Running", "node": "pi-1", "labels": {"app": "web"}}),
            json!({"id": "web-2", "phase": "Pending", "labels": {"app": "web"}}),
            json!({"id": "db-1", "phase": "Running", "node": "pi-2", "restarts": 3}),
        ])
    }

    #[test]
    fn paths_select_fields_items_indexes_keys_and_filters() {
        let v = tasks();
        for (template, want) in [
            ("{.kind}", "List"),
            ("{.items[*].id}", "web-1 web-2 db-1"),
            ("{.items[0].node}", "pi-1"),
            ("{.items[-1].id}", "db-1"),
            ("{.items[5].id}", ""),
            ("{.items[*].node}", "pi-1 pi-2"),
            ("{.items[0].labels['app']}", "web"),
            ("{.items[0].labels[\"app\"]}", "web"),
            ("{$.items[2].restarts}", "3"),
            ("{.items[?(@.phase==\"Running\")].id}", "web-1 db-1"),
            ("{.items[?(@.phase!='Running')].id}", "web-2"),
            ("{.items[?(@.restarts==3)].id}", "db-1"),
            ("{.items[0].labels}", "{\"app\":\"web\"}"),
            ("{.items[0].nothing.deeper}", ""),
            ("ids: {.items[*].id}!", "ids: web-1 web-2 db-1!"),
            (
                "{range .items[*]}{.id}{\"\\t\"}{.phase}{\"\\n\"}{end}",
                "web-1\tRunning\nweb-2\tPending\ndb-1\tRunning\n",
            ),
            ("{range .items}{.id},{end}", "web-1,web-2,db-1,"),
            ("{.items[0].*}", "web-1 {\"app\":\"web\"} pi-1 Running"),
        ] {
            assert_eq!(render(template, &v), want, "{template}");
        }
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        for (template, want) in [
            ("{.items", "unclosed '{'"),
            ("{.items[0}", "unclosed '['"),
            ("{range .items}{.id}", "{range} without {end}"),
            ("{.id}{end}", "{end} without {range}"),
            ("{items}", "paths start with a dot"),
            ("{.items[x]}", "expected *, an index"),
            ("{.items[?(@.a>1)]}", "compares with == or !="),
            ("{\"\\q\"}", "unknown escape"),
            ("{.a..b}", "an empty field name"),
        ] {
            let err = template.parse::<Template>().expect_err(template);
            assert!(err.to_string().contains(want), "{template}: {err}");
        }
    }
}
