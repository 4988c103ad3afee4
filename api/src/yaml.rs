//! YAML text as trees of placed nodes, and a serde deserializer over them that names the
//! place (line, column) and the field path (`spec.ports[0].host`) of every error.
//!
//! The events, with their positions, come from `saphyr-parser`, a YAML 1.2 parser. The
//! serde layer lives here rather than in a serde YAML crate because it is the part that
//! decides which node an error belongs to: serde_yaml (archived) and its fork
//! serde_yaml_ng only write the field path into their error text, and serde-saphyr
//! (which has spans) needs Rust 1.88 or later, above this workspace's 1.85.
//!
//! Scalars are read as serde_yaml 0.9 reads them (YAML 1.2 core schema: `true`, `~`,
//! `0x1F`, `1.5` are typed only when plain; any scalar is accepted where text is wanted),
//! so manifests mean what they meant before.
//!
//! # Limits
//! Text comes from users and from the network, and the controller parses it. So nesting is
//! capped at [`MAX_DEPTH`] (deeper input is refused while it is read, before anything
//! recurses over it), and a document may hold at most [`MAX_NODES`] nodes counting every
//! alias as a copy of what it points at (which refuses "billion laughs" expansions).
//! The tree is a flat arena, so building and dropping it never recurses either.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, ScanError, Tag};
use serde::de::{self, DeserializeOwned, DeserializeSeed, Unexpected, Visitor};

/// Deepest nesting of sequences and mappings a document may have. Real manifests stay
/// under ten levels; the limit only has to keep recursion (serde's, and anything that
/// later walks a value) far from the end of a 2 MiB thread stack.
pub const MAX_DEPTH: usize = 64;

/// Most nodes (scalars, sequences, mappings) one document may hold, with every alias
/// counted as a copy of its target. A large manifest has a few hundred.
pub const MAX_NODES: usize = 100_000;

/// A place in the text: line and column, both counted from 1, columns in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1, in characters.
    pub column: usize,
}

impl Place {
    fn of(m: &Marker) -> Place {
        // saphyr-parser counts lines from 1 but columns from 0.
        Place {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// Why a document could not be read: where, which field (dotted path, empty for the
/// document itself) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Where the problem is.
    pub place: Place,
    /// Dotted path of the field, e.g. `spec.resources.cpu`; empty for the whole document.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Error {
    fn at(place: Place, message: String) -> Error {
        Error {
            place,
            field: String::new(),
            message,
        }
    }
}

/// One YAML document.
#[derive(Debug)]
pub struct Document<'a> {
    nodes: Vec<Node<'a>>,
    root: usize,
}

#[derive(Debug)]
struct Node<'a> {
    at: Place,
    content: Content<'a>,
    /// Nodes this one stands for, itself included, aliases expanded.
    size: usize,
    /// Levels of nesting below this node: 0 for a scalar, 1 for a flat list.
    height: usize,
}

#[derive(Debug)]
enum Content<'a> {
    Scalar(Cow<'a, str>, Style),
    Seq(Vec<usize>),
    Map(Vec<(usize, usize)>),
}

/// How a scalar's text is to be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// Unquoted: `true`, `12`, `~` are typed values.
    Plain,
    /// Quoted, a block scalar, or tagged `!!str`/`!`: always text.
    Text,
}

/// Reads every document of `text`. Stops at the first syntax error, or at the first
/// breach of [`MAX_DEPTH`] or [`MAX_NODES`].
pub fn load(text: &str) -> Result<Vec<Document<'_>>, Error> {
    let mut parser = Parser::new_from_str(text);
    let mut docs = Vec::new();
    let mut builder = Builder::default();
    // Where the current document starts: the place of an empty one.
    let mut start = Place { line: 1, column: 1 };
    // saphyr-parser puts the end of a text without a final line break on the line after
    // it; every place is kept inside the text.
    let end = end_of(text);
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| {
            let mut e = syntax_error(text, &e);
            e.place = e.place.min(end);
            e
        })?;
        let at = Place::of(&span.start).min(end);
        match event {
            Event::Nothing | Event::StreamStart => {}
            Event::DocumentStart(_) => start = at,
            Event::StreamEnd => break,
            Event::DocumentEnd => docs.push(std::mem::take(&mut builder).finish(start)),
            Event::Alias(id) => builder.alias(id, at)?,
            Event::Scalar(value, style, anchor, tag) => {
                let style = scalar_style(style, tag.as_deref(), at)?;
                builder.scalar(value, style, anchor, at)?;
            }
            Event::SequenceStart(anchor, tag) => {
                collection_tag(tag.as_deref(), "seq", at)?;
                builder.open(Content::Seq(Vec::new()), anchor, at)?;
            }
            Event::MappingStart(anchor, tag) => {
                collection_tag(tag.as_deref(), "map", at)?;
                builder.open(Content::Map(Vec::new()), anchor, at)?;
            }
            Event::SequenceEnd | Event::MappingEnd => builder.close()?,
        }
    }
    Ok(docs)
}

/// The place just after the last character, with YAML's line breaks (`\n`, `\r\n`, `\r`).
fn end_of(text: &str) -> Place {
    let mut end = Place { line: 1, column: 1 };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' || c == '\r' {
            if c == '\r' && chars.peek() == Some(&'\n') {
                chars.next();
            }
            end = Place {
                line: end.line + 1,
                column: 1,
            };
        } else {
            end.column += 1;
        }
    }
    end
}

/// A syntax error, with the place the reader should look at. saphyr-parser's own place is
/// kept, except where it points away from the cause: an unknown escape is reported at
/// the opening quote of its string, tabs in indentation after them.
fn syntax_error(text: &str, e: &ScanError) -> Error {
    let mark = e.marker();
    let place = Place::of(mark);
    let info = e.info();
    // The scanner's own guard: it counts flow levels (`[`, `{`) in a byte.
    if info == "recursion limit exceeded" {
        return too_deep(place);
    }
    let refined = if info.contains("unknown escape") {
        bad_escape(text, mark)
    } else if info.contains("tabs disallowed") {
        indenting_tab(text, place)
    } else {
        None
    };
    Error::at(refined.unwrap_or(place), info.to_string())
}

/// The backslash of the first escape that YAML does not know, in the double-quoted
/// string that opens at `quote`.
fn bad_escape(text: &str, quote: &Marker) -> Option<Place> {
    let mut chars = text.chars().skip(quote.index());
    if chars.next() != Some('"') {
        return None;
    }
    let next_line = |p: Place| Place {
        line: p.line + 1,
        column: 1,
    };
    let mut place = Place::of(quote);
    place.column += 1;
    while let Some(c) = chars.next() {
        let here = place;
        match c {
            '"' => return None,
            '\\' => {
                let next = chars.next()?;
                if !matches!(
                    next,
                    '0' | 'a'
                        | 'b'
                        | 't'
                        | '\t'
                        | 'n'
                        | 'v'
                        | 'f'
                        | 'r'
                        | 'e'
                        | ' '
                        | '"'
                        | '/'
                        | '\\'
                        | 'N'
                        | '_'
                        | 'L'
                        | 'P'
                        | 'x'
                        | 'u'
                        | 'U'
                        | '\n'
                        | '\r'
                ) {
                    return Some(here);
                }
                if next == '\n' {
                    place = next_line(place);
                } else {
                    place.column += 2;
                }
            }
            '\n' => place = next_line(place),
            _ => place.column += 1,
        }
    }
    None
}

/// The first tab in the indentation of the line of `at`.
fn indenting_tab(text: &str, at: Place) -> Option<Place> {
    let line = text.split('\n').nth(at.line.checked_sub(1)?)?;
    let tab = line
        .chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .position(|c| c == '\t')?;
    Some(Place {
        line: at.line,
        column: tab + 1,
    })
}

/// Tags only say "this is text" or name the type the node has anyway; anything else
/// (`!Secret`, `!!binary`) would be silently ignored, so it is refused.
fn scalar_style(style: ScalarStyle, tag: Option<&Tag>, at: Place) -> Result<Style, Error> {
    let plain = if style == ScalarStyle::Plain {
        Style::Plain
    } else {
        Style::Text
    };
    match tag {
        None => Ok(plain),
        // The non-specific tag `!`: a string, whatever it looks like.
        Some(t) if t.handle.is_empty() && t.suffix == "!" => Ok(Style::Text),
        Some(t) if t.is_yaml_core_schema() => match t.suffix.as_str() {
            "str" => Ok(Style::Text),
            "int" | "float" | "bool" | "null" => Ok(plain),
            _ => Err(unsupported_tag(t, at)),
        },
        Some(t) => Err(unsupported_tag(t, at)),
    }
}

fn collection_tag(tag: Option<&Tag>, kind: &str, at: Place) -> Result<(), Error> {
    match tag {
        None => Ok(()),
        Some(t) if t.is_yaml_core_schema() && t.suffix == kind => Ok(()),
        Some(t) => Err(unsupported_tag(t, at)),
    }
}

fn unsupported_tag(t: &Tag, at: Place) -> Error {
    // Spelled as written: `!!binary`, `!Secret`.
    let shown = if t.is_yaml_core_schema() {
        format!("!!{}", t.suffix)
    } else {
        format!("{}{}", t.handle, t.suffix)
    };
    Error::at(at, format!("unsupported tag `{shown}`"))
}

/// Turns the parser's events into a [`Document`], one node at a time, without recursion.
#[derive(Default)]
struct Builder<'a> {
    nodes: Vec<Node<'a>>,
    /// Sequences and mappings not closed yet, outermost first.
    open: Vec<Open>,
    /// Anchor id (from the parser) to the node it names; set once the node is complete, so
    /// an alias can never point into its own ancestor.
    anchors: HashMap<usize, usize>,
    /// Nodes so far, aliases expanded.
    total: usize,
    root: Option<usize>,
}

struct Open {
    node: usize,
    anchor: usize,
    /// A mapping's key waiting for its value.
    key: Option<usize>,
}

impl<'a> Builder<'a> {
    fn scalar(
        &mut self,
        text: Cow<'a, str>,
        style: Style,
        anchor: usize,
        at: Place,
    ) -> Result<(), Error> {
        self.count(1, at)?;
        let idx = self.push(at, Content::Scalar(text, style));
        self.name(anchor, idx);
        self.attach(idx);
        Ok(())
    }

    fn open(&mut self, content: Content<'a>, anchor: usize, at: Place) -> Result<(), Error> {
        if self.open.len() >= MAX_DEPTH {
            return Err(too_deep(at));
        }
        self.count(1, at)?;
        let node = self.push(at, content);
        self.open.push(Open {
            node,
            anchor,
            key: None,
        });
        Ok(())
    }

    fn close(&mut self) -> Result<(), Error> {
        let Some(o) = self.open.pop() else {
            // The parser pairs every end with a start; nothing to close means nothing to do.
            return Ok(());
        };
        let nodes = &self.nodes;
        let measure = |children: &mut dyn Iterator<Item = usize>| {
            children.fold((1usize, 1usize), |(size, height), c| {
                let c = &nodes[c];
                (size.saturating_add(c.size), height.max(c.height + 1))
            })
        };
        let (size, height) = match &nodes[o.node].content {
            Content::Seq(items) => measure(&mut items.iter().copied()),
            Content::Map(entries) => measure(&mut entries.iter().flat_map(|&(k, v)| [k, v])),
            Content::Scalar(..) => (1, 0),
        };
        self.check_keys(o.node)?;
        let n = &mut self.nodes[o.node];
        n.size = size;
        n.height = height;
        self.name(o.anchor, o.node);
        self.attach(o.node);
        Ok(())
    }

    /// YAML forbids a key twice in one mapping; serde would keep the last one silently
    /// for maps such as `env`, and a type's own error handling could hide it, so it is
    /// refused here, before serde sees the mapping.
    fn check_keys(&self, map: usize) -> Result<(), Error> {
        let Content::Map(entries) = &self.nodes[map].content else {
            return Ok(());
        };
        let mut seen: HashMap<&str, Place> = HashMap::with_capacity(entries.len());
        for &(k, _) in entries {
            let key = &self.nodes[k];
            let Content::Scalar(name, _) = &key.content else {
                continue;
            };
            if let Some(first) = seen.insert(name, key.at) {
                let parent = self.path_here();
                return Err(Error {
                    place: key.at,
                    field: if parent.is_empty() {
                        name.to_string()
                    } else {
                        format!("{parent}.{name}")
                    },
                    message: format!(
                        "duplicate key {name:?}: already given at line {}",
                        first.line
                    ),
                });
            }
        }
        Ok(())
    }

    /// The dotted path of the node being built inside the open collections.
    fn path_here(&self) -> String {
        let mut path = String::new();
        for o in &self.open {
            match &self.nodes[o.node].content {
                Content::Map(_) => {
                    let key = o.key.and_then(|k| match &self.nodes[k].content {
                        Content::Scalar(name, _) => Some(name),
                        _ => None,
                    });
                    if let Some(name) = key {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(name);
                    }
                }
                Content::Seq(items) => path.push_str(&format!("[{}]", items.len())),
                Content::Scalar(..) => {}
            }
        }
        path
    }

    fn alias(&mut self, id: usize, at: Place) -> Result<(), Error> {
        let Some(&target) = self.anchors.get(&id) else {
            // saphyr-parser refuses undefined anchors itself; what is left is an alias
            // inside the very node its anchor names (`&a [*a]`), or to another document.
            return Err(Error::at(
                at,
                "alias to a node that contains it or is in another document".into(),
            ));
        };
        let (size, height) = (self.nodes[target].size, self.nodes[target].height);
        if self.open.len() + height > MAX_DEPTH {
            return Err(too_deep(at));
        }
        self.count(size, at)?;
        self.attach(target);
        Ok(())
    }

    fn count(&mut self, n: usize, at: Place) -> Result<(), Error> {
        self.total = self.total.saturating_add(n);
        if self.total > MAX_NODES {
            return Err(Error::at(
                at,
                format!("too many values: more than {MAX_NODES} in one document (aliases count as copies)"),
            ));
        }
        Ok(())
    }

    fn push(&mut self, at: Place, content: Content<'a>) -> usize {
        self.nodes.push(Node {
            at,
            content,
            size: 1,
            height: 0,
        });
        self.nodes.len() - 1
    }

    fn name(&mut self, anchor: usize, idx: usize) {
        // The parser numbers anchors from 1; 0 means "no anchor".
        if anchor != 0 {
            self.anchors.insert(anchor, idx);
        }
    }

    /// Puts a finished node into the innermost open collection, or makes it the root.
    fn attach(&mut self, idx: usize) {
        let Some(o) = self.open.last_mut() else {
            self.root = Some(idx);
            return;
        };
        match &mut self.nodes[o.node].content {
            Content::Seq(items) => items.push(idx),
            Content::Map(entries) => match o.key.take() {
                None => o.key = Some(idx),
                Some(k) => entries.push((k, idx)),
            },
            Content::Scalar(..) => {}
        }
    }

    fn finish(mut self, start: Place) -> Document<'a> {
        let root = match self.root {
            Some(r) => r,
            // A document with no node at all reads as an empty (null) scalar.
            None => self.push(start, Content::Scalar("".into(), Style::Plain)),
        };
        Document {
            nodes: self.nodes,
            root,
        }
    }
}

fn too_deep(at: Place) -> Error {
    Error::at(
        at,
        format!("nested too deeply: more than {MAX_DEPTH} levels"),
    )
}

impl Document<'_> {
    /// Place of the root node.
    pub fn start(&self) -> Place {
        self.nodes[self.root].at
    }

    /// Where the field at a dotted `path` is written: its key for a mapping entry, the
    /// item for a sequence entry. If the path does not exist, the place of its nearest
    /// ancestor that does; line 1, column 1 if none does.
    pub fn place_of(&self, path: &str) -> Place {
        let mut best = Place { line: 1, column: 1 };
        let mut node = self.root;
        let mut rest = path;
        while !rest.is_empty() {
            match &self.nodes[node].content {
                Content::Map(entries) => {
                    let r = rest.strip_prefix('.').unwrap_or(rest);
                    // Keys may contain dots (`app.kubernetes.io/name`): take the longest
                    // key that ends where a path segment ends.
                    let hit = entries
                        .iter()
                        .filter_map(|&(k, v)| {
                            let key = self.scalar_text(k)?;
                            let after = r.strip_prefix(key)?;
                            (after.is_empty() || after.starts_with(['.', '['])).then_some((
                                key.len(),
                                k,
                                v,
                                after,
                            ))
                        })
                        .max_by_key(|(len, ..)| *len);
                    let Some((_, k, v, after)) = hit else { break };
                    best = self.nodes[k].at;
                    node = v;
                    rest = after;
                }
                Content::Seq(items) => {
                    let Some((index, after)) = rest
                        .strip_prefix('[')
                        .and_then(|r| r.split_once(']'))
                        .and_then(|(i, after)| Some((i.parse::<usize>().ok()?, after)))
                    else {
                        break;
                    };
                    let Some(&item) = items.get(index) else { break };
                    best = self.nodes[item].at;
                    node = item;
                    rest = after;
                }
                Content::Scalar(..) => break,
            }
        }
        best
    }

    fn scalar_text(&self, idx: usize) -> Option<&str> {
        match &self.nodes[idx].content {
            Content::Scalar(text, _) => Some(text),
            _ => None,
        }
    }

    /// Deserializes the document as a `T`; an error names its place and field.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let path = Path::Root;
        let de = NodeDe {
            doc: self,
            node: self.root,
            path: &path,
        };
        T::deserialize(de)
            .map_err(|e| e.locate(&self.nodes[self.root], &path, None))
            .map_err(|e| {
                let (place, field) = e.at.unwrap_or((self.start(), String::new()));
                Error {
                    place,
                    field,
                    message: e.message,
                }
            })
    }
}

/// Where a node sits, as the chain of keys and indices from the root. It lives on the
/// stack of the deserializer's own recursion and is turned into text only for an error.
#[derive(Clone, Copy)]
enum Path<'p> {
    Root,
    Key(&'p Path<'p>, &'p str),
    Index(&'p Path<'p>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut segments = Vec::new();
        let mut p = self;
        loop {
            match p {
                Path::Root => break,
                Path::Key(parent, key) => {
                    segments.push(Segment::Key(key));
                    p = parent;
                }
                Path::Index(parent, i) => {
                    segments.push(Segment::Index(*i));
                    p = parent;
                }
            }
        }
        let mut first = true;
        for s in segments.iter().rev() {
            match s {
                Segment::Key(k) if first => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

enum Segment<'p> {
    Key(&'p str),
    Index(usize),
}

/// A serde error on its way up from the node where it arose.
#[derive(Debug)]
struct DeError {
    message: String,
    kind: Kind,
    /// Place and field path, filled in by the innermost node that sees the error.
    at: Option<(Place, String)>,
}

/// Which place an error belongs to.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// The node read is wrong: its type or variant (`invalid type`, `unknown variant`),
    /// or, for a key, its name (`unknown field`). The place is the node's own.
    Node,
    /// A value's own check failed (`invalid cpu quantity "fast"`): the field's key, as
    /// for every other field-level problem.
    Field,
    /// A field is missing: the mapping that lacks it (its key, if it has one).
    Missing(&'static str),
}

impl DeError {
    fn new(kind: Kind, message: String) -> DeError {
        DeError {
            message,
            kind,
            at: None,
        }
    }

    /// Fills in the place and field of an error raised while `node` (at `path`, written
    /// under the key at `key_at` if any) was being deserialized, unless a node inside it
    /// already did.
    fn locate(mut self, node: &Node<'_>, path: &Path<'_>, key_at: Option<Place>) -> DeError {
        if self.at.is_none() {
            let field_at = key_at.unwrap_or(node.at);
            self.at = Some(match self.kind {
                Kind::Node => (node.at, path.to_string()),
                Kind::Field => (field_at, path.to_string()),
                Kind::Missing(name) => (field_at, Path::Key(path, name).to_string()),
            });
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

/// serde's own wording for its standard errors, so messages read as they always have.
fn serde_text(e: de::value::Error) -> String {
    e.to_string()
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::new(Kind::Field, msg.to_string())
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::new(
            Kind::Node,
            serde_text(de::value::Error::invalid_type(unexp, exp)),
        )
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::new(
            Kind::Node,
            serde_text(de::value::Error::invalid_value(unexp, exp)),
        )
    }

    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        DeError::new(
            Kind::Node,
            serde_text(de::value::Error::invalid_length(len, exp)),
        )
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(
            Kind::Node,
            serde_text(de::value::Error::unknown_variant(variant, expected)),
        )
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError::new(
            Kind::Node,
            serde_text(de::value::Error::unknown_field(field, expected)),
        )
    }

    fn missing_field(field: &'static str) -> Self {
        DeError::new(
            Kind::Missing(field),
            serde_text(de::value::Error::missing_field(field)),
        )
    }
}

type DeResult<T> = Result<T, DeError>;

/// Deserializes one node. Recursion follows the document's nesting, which [`load`] has
/// capped at [`MAX_DEPTH`].
struct NodeDe<'d, 'a, 'p> {
    doc: &'d Document<'a>,
    node: usize,
    path: &'p Path<'p>,
}

impl<'d, 'a> NodeDe<'d, 'a, '_> {
    fn get(&self) -> &'d Node<'a> {
        &self.doc.nodes[self.node]
    }

    /// The plain scalar's text, if the node is one.
    fn plain(&self) -> Option<&'d str> {
        match &self.get().content {
            Content::Scalar(text, Style::Plain) => Some(text),
            _ => None,
        }
    }

    /// An `invalid type` error: what the node is, against what was expected.
    fn invalid<T>(&self, exp: &dyn de::Expected) -> DeResult<T> {
        let wide;
        let unexpected = match &self.get().content {
            Content::Seq(_) => Unexpected::Seq,
            Content::Map(_) => Unexpected::Map,
            Content::Scalar(text, Style::Text) => Unexpected::Str(text),
            Content::Scalar(text, Style::Plain) => match resolve(text) {
                Resolved::Null => Unexpected::Unit,
                Resolved::Bool(b) => Unexpected::Bool(b),
                Resolved::Unsigned(u) => Unexpected::Unsigned(u),
                Resolved::Signed(i) => Unexpected::Signed(i),
                // serde's own words for integers it has no `Unexpected` for.
                Resolved::Unsigned128(u) => {
                    wide = format!("integer `{u}` as u128");
                    Unexpected::Other(&wide)
                }
                Resolved::Signed128(i) => {
                    wide = format!("integer `{i}` as i128");
                    Unexpected::Other(&wide)
                }
                Resolved::Float(f) => Unexpected::Float(f),
                Resolved::Str => Unexpected::Str(text),
            },
        };
        Err(de::Error::invalid_type(unexpected, exp))
    }

    /// A plain empty scalar (`ports:` with nothing after it) reads as an empty collection,
    /// as it did with serde_yaml.
    fn is_empty_plain(&self) -> bool {
        self.plain().is_some_and(str::is_empty)
    }

    fn is_null(&self) -> bool {
        self.plain()
            .is_some_and(|t| matches!(resolve(t), Resolved::Null))
    }
}

/// A plain scalar's meaning under the YAML 1.2 core schema, as serde_yaml 0.9 read it.
enum Resolved {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    /// Integers beyond 64 bits.
    Unsigned128(u128),
    Signed128(i128),
    Float(f64),
    Str,
}

fn resolve(text: &str) -> Resolved {
    if text.is_empty() || parse_null(text) {
        Resolved::Null
    } else if let Some(b) = parse_bool(text) {
        Resolved::Bool(b)
    } else if let Some(u) = parse_unsigned(text) {
        Resolved::Unsigned(u)
    } else if let Some(i) = parse_signed(text) {
        Resolved::Signed(i)
    } else if let Some(u) = parse_unsigned_wide(text) {
        Resolved::Unsigned128(u)
    } else if let Some(i) = parse_signed_wide(text) {
        Resolved::Signed128(i)
    } else if let Some(f) = (!digits_but_not_number(text))
        .then(|| parse_float(text))
        .flatten()
    {
        Resolved::Float(f)
    } else {
        Resolved::Str
    }
}

fn parse_null(t: &str) -> bool {
    matches!(t, "~" | "null" | "Null" | "NULL")
}

fn parse_bool(t: &str) -> Option<bool> {
    match t {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// Digits with a leading zero (`0755`) are text in YAML 1.2, not octal or decimal.
fn digits_but_not_number(t: &str) -> bool {
    let t = t.strip_prefix(['-', '+']).unwrap_or(t);
    t.len() > 1 && t.starts_with('0') && t[1..].bytes().all(|b| b.is_ascii_digit())
}

/// `0x`, `0o` and `0b` prefixes with their radix, else decimal.
fn radix_of(t: &str) -> (&str, u32) {
    if let Some(r) = t.strip_prefix("0x") {
        (r, 16)
    } else if let Some(r) = t.strip_prefix("0o") {
        (r, 8)
    } else if let Some(r) = t.strip_prefix("0b") {
        (r, 2)
    } else {
        (t, 10)
    }
}

fn unsigned_digits(t: &str) -> Option<(&str, u32)> {
    let t = t.strip_prefix('+').unwrap_or(t);
    let (digits, radix) = radix_of(t);
    // `from_str_radix` itself accepts a sign; YAML does not after a prefix or a `+`.
    if digits.starts_with(['+', '-']) || digits_but_not_number(t) {
        return None;
    }
    Some((digits, radix))
}

fn parse_unsigned(t: &str) -> Option<u64> {
    let (digits, radix) = unsigned_digits(t)?;
    u64::from_str_radix(digits, radix).ok()
}

fn parse_unsigned_wide(t: &str) -> Option<u128> {
    let (digits, radix) = unsigned_digits(t)?;
    u128::from_str_radix(digits, radix).ok()
}

fn signed_digits(t: &str) -> Option<(String, u32)> {
    let (negative, rest) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (digits, radix) = radix_of(rest);
    if digits.starts_with(['+', '-']) || digits_but_not_number(t) {
        return None;
    }
    Some((
        if negative {
            format!("-{digits}")
        } else {
            digits.to_string()
        },
        radix,
    ))
}

fn parse_signed(t: &str) -> Option<i64> {
    let (digits, radix) = signed_digits(t)?;
    i64::from_str_radix(&digits, radix).ok()
}

fn parse_signed_wide(t: &str) -> Option<i128> {
    let (digits, radix) = signed_digits(t)?;
    i128::from_str_radix(&digits, radix).ok()
}

fn parse_float(t: &str) -> Option<f64> {
    let unsigned = match t.strip_prefix('+') {
        Some(r) if r.starts_with(['+', '-']) => return None,
        Some(r) => r,
        None => t,
    };
    match unsigned {
        ".inf" | ".Inf" | ".INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    // Rust also reads `inf` and `NaN`, which YAML spells with a dot; only finite values
    // come from here.
    unsigned.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// Methods that read their node as another method does.
macro_rules! forward {
    ($($method:ident => $target:ident),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
            self.$target(visitor)
        })*
    };
}

impl<'de> de::Deserializer<'de> for NodeDe<'_, '_, '_> {
    type Error = DeError;

    forward! {
        deserialize_i8 => deserialize_i64,
        deserialize_i16 => deserialize_i64,
        deserialize_i32 => deserialize_i64,
        deserialize_u8 => deserialize_u64,
        deserialize_u16 => deserialize_u64,
        deserialize_u32 => deserialize_u64,
        deserialize_f32 => deserialize_f64,
        deserialize_char => deserialize_str,
        deserialize_string => deserialize_str,
        deserialize_bytes => deserialize_str,
        deserialize_byte_buf => deserialize_str,
        deserialize_identifier => deserialize_str,
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match &self.get().content {
            Content::Seq(items) => visitor.visit_seq(SeqDe::new(self.doc, items, self.path)),
            Content::Map(entries) => visitor.visit_map(MapDe::new(self.doc, entries, self.path)),
            Content::Scalar(text, Style::Text) => visitor.visit_str(text),
            Content::Scalar(text, Style::Plain) => match resolve(text) {
                Resolved::Null => visitor.visit_unit(),
                Resolved::Bool(b) => visitor.visit_bool(b),
                Resolved::Unsigned(u) => visitor.visit_u64(u),
                Resolved::Signed(i) => visitor.visit_i64(i),
                Resolved::Unsigned128(u) => visitor.visit_u128(u),
                Resolved::Signed128(i) => visitor.visit_i128(i),
                Resolved::Float(f) => visitor.visit_f64(f),
                Resolved::Str => visitor.visit_str(text),
            },
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match self.plain().and_then(parse_bool) {
            Some(b) => visitor.visit_bool(b),
            None => self.invalid(&visitor),
        }
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match self.plain().and_then(parse_signed) {
            Some(i) => visitor.visit_i64(i),
            None => self.invalid(&visitor),
        }
    }

    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match self.plain().and_then(parse_signed_wide) {
            Some(i) => visitor.visit_i128(i),
            None => self.invalid(&visitor),
        }
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match self.plain().and_then(parse_unsigned) {
            Some(u) => visitor.visit_u64(u),
            None => self.invalid(&visitor),
        }
    }

    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match self.plain().and_then(parse_unsigned_wide) {
            Some(u) => visitor.visit_u128(u),
            None => self.invalid(&visitor),
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match self.plain().and_then(parse_float) {
            Some(f) => visitor.visit_f64(f),
            None => self.invalid(&visitor),
        }
    }

    /// Any scalar is text where text is wanted (`image: 1` is the image "1").
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match &self.get().content {
            Content::Scalar(text, _) => visitor.visit_str(text),
            _ => self.invalid(&visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        if self.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        if self.is_null() {
            visitor.visit_unit()
        } else {
            self.invalid(&visitor)
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> DeResult<V::Value> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> DeResult<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match &self.get().content {
            Content::Seq(items) => visitor.visit_seq(SeqDe::new(self.doc, items, self.path)),
            _ if self.is_empty_plain() => visitor.visit_seq(SeqDe::new(self.doc, &[], self.path)),
            _ => self.invalid(&visitor),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> DeResult<V::Value> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> DeResult<V::Value> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        match &self.get().content {
            Content::Map(entries) => visitor.visit_map(MapDe::new(self.doc, entries, self.path)),
            _ if self.is_empty_plain() => visitor.visit_map(MapDe::new(self.doc, &[], self.path)),
            _ => self.invalid(&visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> DeResult<V::Value> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> DeResult<V::Value> {
        match &self.get().content {
            Content::Scalar(..) => visitor.visit_enum(EnumDe {
                doc: self.doc,
                node: self.node,
                path: self.path,
            }),
            _ => self.invalid(&visitor),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> DeResult<V::Value> {
        visitor.visit_unit()
    }
}

/// Hands `node` to `seed` and places any error that comes back without a place.
fn run<'de, S: DeserializeSeed<'de>>(
    seed: S,
    doc: &Document<'_>,
    node: usize,
    path: &Path<'_>,
    key_at: Option<Place>,
) -> DeResult<S::Value> {
    seed.deserialize(NodeDe { doc, node, path })
        .map_err(|e| e.locate(&doc.nodes[node], path, key_at))
}

struct SeqDe<'d, 'a, 'p> {
    doc: &'d Document<'a>,
    items: &'d [usize],
    next: usize,
    path: &'p Path<'p>,
}

impl<'d, 'a, 'p> SeqDe<'d, 'a, 'p> {
    fn new(doc: &'d Document<'a>, items: &'d [usize], path: &'p Path<'p>) -> Self {
        SeqDe {
            doc,
            items,
            next: 0,
            path,
        }
    }
}

impl<'de> de::SeqAccess<'de> for SeqDe<'_, '_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> DeResult<Option<T::Value>> {
        let Some(&item) = self.items.get(self.next) else {
            return Ok(None);
        };
        let path = Path::Index(self.path, self.next);
        self.next += 1;
        run(seed, self.doc, item, &path, None).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len() - self.next)
    }
}

struct MapDe<'d, 'a, 'p> {
    doc: &'d Document<'a>,
    entries: &'d [(usize, usize)],
    next: usize,
    path: &'p Path<'p>,
}

impl<'d, 'a, 'p> MapDe<'d, 'a, 'p> {
    fn new(doc: &'d Document<'a>, entries: &'d [(usize, usize)], path: &'p Path<'p>) -> Self {
        MapDe {
            doc,
            entries,
            next: 0,
            path,
        }
    }

    /// The path of the entry whose key is `k`; a key that is not a scalar adds nothing.
    fn entry_path<'x>(doc: &'x Document<'_>, parent: &'x Path<'x>, k: usize) -> Path<'x> {
        match doc.scalar_text(k) {
            Some(name) => Path::Key(parent, name),
            None => *parent,
        }
    }
}

impl<'de> de::MapAccess<'de> for MapDe<'_, '_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> DeResult<Option<K::Value>> {
        let Some(&(k, _)) = self.entries.get(self.next) else {
            return Ok(None);
        };
        let path = Self::entry_path(self.doc, self.path, k);
        run(seed, self.doc, k, &path, None).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> DeResult<V::Value> {
        let Some(&(k, v)) = self.entries.get(self.next) else {
            return Err(de::Error::custom(
                "a value was asked for past the end of a mapping",
            ));
        };
        self.next += 1;
        let path = Self::entry_path(self.doc, self.path, k);
        run(seed, self.doc, v, &path, Some(self.doc.nodes[k].at))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len() - self.next)
    }
}

/// A unit variant, written as its name (`policy: Always`). Manifests have no enums with
/// content, so the mapping form (`{Variant: value}`) is not read.
struct EnumDe<'d, 'a, 'p> {
    doc: &'d Document<'a>,
    node: usize,
    path: &'p Path<'p>,
}

impl<'de, 'd, 'a, 'p> de::EnumAccess<'de> for EnumDe<'d, 'a, 'p> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> DeResult<(V::Value, Self)> {
        let v = run(seed, self.doc, self.node, self.path, None)?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for EnumDe<'_, '_, '_> {
    type Error = DeError;

    fn unit_variant(self) -> DeResult<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> DeResult<T::Value> {
        Err(de::Error::invalid_type(
            Unexpected::UnitVariant,
            &"newtype variant",
        ))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> DeResult<V::Value> {
        Err(de::Error::invalid_type(
            Unexpected::UnitVariant,
            &"tuple variant",
        ))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> DeResult<V::Value> {
        Err(de::Error::invalid_type(
            Unexpected::UnitVariant,
            &"struct variant",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    fn load_err(text: &str) -> Error {
        load(text).expect_err("should be refused")
    }

    #[test]
    fn nesting_up_to_the_limit_is_read_and_one_more_level_is_refused() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(load(&nested(MAX_DEPTH)).expect("at the limit").len(), 1);
        let e = load_err(&nested(MAX_DEPTH + 1));
        assert_eq!(
            (e.place.line, e.place.column),
            (1, MAX_DEPTH + 1),
            "the first bracket too deep: {e:?}"
        );
        assert_eq!(e.message, "nested too deeply: more than 64 levels");
    }

    #[test]
    fn an_alias_may_not_carry_nesting_past_the_limit() {
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        let text = format!("a: &x {deep}\nb: {}*x{}\n", "[".repeat(30), "]".repeat(30));
        let e = load_err(&text);
        assert!(e.message.contains("nested too deeply"), "{e:?}");
        assert_eq!((e.place.line, e.place.column), (2, 34), "{e:?}");
        // The same anchor used where it fits is fine.
        assert!(load(&format!("a: &x {deep}\nb: [*x]\n")).is_ok());
    }

    #[test]
    fn aliases_count_as_copies_so_billion_laughs_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text += &format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n");
        }
        let e = load_err(&text);
        assert!(e.message.starts_with("too many values"), "{e:?}");
        // a4 would stand for 111,111 nodes.
        assert_eq!(e.place.line, 5, "{e:?}");
    }

    #[test]
    fn an_alias_inside_its_own_anchor_is_refused() {
        let e = load_err("a: &x [1, *x]\n");
        assert_eq!((e.place.line, e.place.column), (1, 11), "{e:?}");
        assert!(e.message.contains("contains it"), "{e:?}");
    }

    #[test]
    fn tags_that_name_no_plain_type_are_refused() {
        for (text, ok) in [
            ("a: !!str 12", true),
            ("a: ! 12", true),
            ("a: !!int 12", true),
            ("a: !!map {b: 1}", true),
            ("a: !!seq [1]", true),
            ("a: !!binary aGk=", false),
            ("a: !Secret x", false),
            ("a: !!map [1]", false),
            ("a: !custom {b: 1}", false),
        ] {
            let r = load(text);
            assert_eq!(r.is_ok(), ok, "{text}: {:?}", r.err());
            if let Err(e) = r {
                assert!(e.message.starts_with("unsupported tag `!"), "{e:?}");
                assert_eq!((e.place.line, e.place.column), (1, 4), "{e:?}");
            }
        }
    }

    #[test]
    fn place_of_follows_keys_with_dots_and_list_indices() {
        let text = "\
a:
  app.kubernetes.io/name: x
  app: y
  list:
    - first
    - {k: v}
";
        let doc = load(text).expect("valid").remove(0);
        let at = |p: &str| {
            let pl = doc.place_of(p);
            (pl.line, pl.column)
        };
        assert_eq!(at("a.app.kubernetes.io/name"), (2, 3));
        assert_eq!(at("a.app"), (3, 3));
        assert_eq!(at("a.list[1].k"), (6, 8));
        assert_eq!(at("a.list[1].missing"), (6, 7), "nearest ancestor");
        assert_eq!(at("a.list[7]"), (4, 3), "nearest ancestor");
        assert_eq!(at("nowhere"), (1, 1));
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct One<T> {
        v: T,
    }

    /// The shape `string_map` in `manifest` reads env and label values with.
    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        B(bool),
        U(u64),
        I(i64),
        F(f64),
    }

    /// Decodes `text` both here and with serde_yaml 0.9: both must accept it with the
    /// same value, or both refuse it (with the same words for a type error).
    fn same_as_serde_yaml<T>(text: &str)
    where
        T: DeserializeOwned + PartialEq + fmt::Debug,
    {
        let ours = load(text).map_err(|e| e.message).and_then(|mut d| {
            d.pop()
                .ok_or_else(|| "no document".to_string())?
                .decode::<T>()
                .map_err(|e| e.message)
        });
        let theirs = serde_yaml::from_str::<T>(text).map_err(|e| {
            let t = e.to_string();
            let t = t.strip_prefix("v: ").unwrap_or(&t).to_string();
            match t.rfind(" at line ") {
                Some(i) => t[..i].to_string(),
                None => t,
            }
        });
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{text:?}"),
            (Err(a), Err(b)) if b.starts_with("invalid") => assert_eq!(a, b, "{text:?}"),
            (Err(_), Err(_)) => {}
            _ => panic!("{text:?}: ours {ours:?}, serde_yaml {theirs:?}"),
        }
    }

    #[test]
    fn scalars_mean_what_they_meant_with_serde_yaml() {
        for v in [
            "8080",
            "0x1F",
            "0o17",
            "0b101",
            "+12",
            "-12",
            "-0x10",
            "010",
            "1.5",
            "1e3",
            ".5",
            "-.inf",
            ".nan",
            "1_000",
            "true",
            "True",
            "yes",
            "off",
            "~",
            "null",
            "",
            "''",
            "'12'",
            "\"true\"",
            "abc",
            "2001:db8::1",
            "12:30",
            "9999999999999999999999",
            "-9223372036854775809",
            "0x",
            "+-1",
            "1.",
            "|\n  x",
            ">\n  y",
        ] {
            let text = format!("v: {v}\n");
            same_as_serde_yaml::<One<String>>(&text);
            same_as_serde_yaml::<One<Option<String>>>(&text);
            same_as_serde_yaml::<One<u32>>(&text);
            same_as_serde_yaml::<One<Option<u16>>>(&text);
            same_as_serde_yaml::<One<i64>>(&text);
            same_as_serde_yaml::<One<bool>>(&text);
            same_as_serde_yaml::<One<Option<bool>>>(&text);
            same_as_serde_yaml::<One<Vec<String>>>(&text);
            same_as_serde_yaml::<One<BTreeMap<String, String>>>(&text);
            if !v.contains("nan") {
                same_as_serde_yaml::<One<f64>>(&text);
                same_as_serde_yaml::<One<Scalar>>(&text);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn plain_scalars_mean_what_they_meant_with_serde_yaml(
            v in "[-+]?(0x|0o|0b)?[0-9a-fA-F._eE]{0,8}|[a-zA-Z~]{1,6}"
        ) {
            let text = format!("v: {v}\n");
            same_as_serde_yaml::<One<String>>(&text);
            same_as_serde_yaml::<One<u32>>(&text);
            same_as_serde_yaml::<One<i64>>(&text);
            same_as_serde_yaml::<One<bool>>(&text);
            same_as_serde_yaml::<One<Option<u16>>>(&text);
            if !v.to_ascii_lowercase().contains("nan") {
                same_as_serde_yaml::<One<f64>>(&text);
                same_as_serde_yaml::<One<Scalar>>(&text);
            }
        }
    }
}
