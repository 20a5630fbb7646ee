//! `racewatch watch --config FILE`: windows written in TOML, one `[[window]]` table each. Parsing
//! is pure (text in, windows out) so that every refusal is tested without a kernel; each names
//! the file, the line and the key, and the lines are kept for what only the plan finds wrong (a
//! file or a function that is not there).
use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    targets::native::window::{Role, Window},
    text::escape,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    window: Vec<Spanned<Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    name: Spanned<String>,
    binary: Option<Spanned<PathBuf>>,
    open: Spanned<String>,
    close: Spanned<String>,
    access: Spanned<String>,
    object_arg: Option<Spanned<u32>>,
    miss_ret: Option<i64>,
}

/// A config file's windows.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub windows: Vec<Configured>,
}

/// A window and the lines its keys are on.
#[derive(Debug)]
pub struct Configured {
    pub window: Window,
    header_line: usize,
    binary_line: Option<usize>,
    /// `open`, `close` and `access`, in that order.
    role_lines: [usize; 3],
}

/// What is wrong with a config file, and where.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    /// None when the file could not be read at all.
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let path = escape(&self.path.to_string_lossy());
        match (self.line, &self.key) {
            (Some(line), Some(key)) => {
                write!(f, "{path}:{line}: key `{}`: {}", escape(key), self.message)
            }
            (Some(line), None) => write!(f, "{path}:{line}: {}", self.message),
            (None, _) => write!(f, "{path}: {}", self.message),
        }
    }
}

/// Functions racewatch can read the object from: the argument registers.
const MAX_OBJECT_ARG: u32 = 5;

/// The 1-based line of byte `at` of `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// The key a parse error is about: the one written on its line (a value of the wrong type, an
/// unknown or repeated key), else the one its message quotes (a missing key's error points at the
/// table's header).
fn key_of(text: &str, at: usize, message: &str) -> Option<String> {
    let start = text[..at.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let written = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let quoted = || message.split('`').nth(1);
    written.or_else(quoted).map(str::to_string)
}

impl Config {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read it: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parses `text`, the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let error = |at: usize, key: &str, message: String| ConfigError {
            path: path.to_path_buf(),
            line: Some(line_of(text, at)),
            key: Some(key.to_string()),
            message,
        };
        let file: File = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            ConfigError {
                path: path.to_path_buf(),
                line: Some(line_of(text, at)),
                key: key_of(text, at, e.message()),
                message: e.message().to_string(),
            }
        })?;
        if file.window.is_empty() {
            return Err(error(
                0,
                "window",
                "no window: give one [[window]] table each".into(),
            ));
        }
        let mut named: HashMap<String, usize> = HashMap::new();
        let mut windows = Vec::new();
        for table in file.window {
            let header_line = line_of(text, table.span().start);
            let t = table.into_inner();
            let name_at = t.name.span().start;
            let name = t.name.into_inner();
            if name.is_empty() {
                return Err(error(
                    name_at,
                    "name",
                    "a window's name cannot be empty".into(),
                ));
            }
            if let Some(first) = named.insert(name.clone(), line_of(text, name_at)) {
                return Err(error(
                    name_at,
                    "name",
                    format!(
                        "the name {:?} is already the window's at line {first}",
                        name
                    ),
                ));
            }
            let object_arg = match t.object_arg {
                Some(arg) if *arg.get_ref() > MAX_OBJECT_ARG => {
                    return Err(error(
                        arg.span().start,
                        "object_arg",
                        format!(
                            "{} is not an argument racewatch reads: give 0 to {MAX_OBJECT_ARG}",
                            arg.get_ref()
                        ),
                    ));
                }
                Some(arg) => arg.into_inner(),
                None => 0,
            };
            let line = |s: &Spanned<String>| line_of(text, s.span().start);
            windows.push(Configured {
                header_line,
                binary_line: t.binary.as_ref().map(|b| line_of(text, b.span().start)),
                role_lines: [line(&t.open), line(&t.close), line(&t.access)],
                window: Window {
                    name,
                    binary: t.binary.map(Spanned::into_inner),
                    open: t.open.into_inner(),
                    close: t.close.into_inner(),
                    access: t.access.into_inner(),
                    object_arg,
                    miss_ret: t.miss_ret,
                },
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            windows,
        })
    }

    /// `error` about `w`'s function in `role`, or with None its file, found after parsing (not
    /// there), at the line of its key (a window without `binary` gets its header's line).
    pub fn error(
        &self,
        w: &Configured,
        role: Option<Role>,
        error: impl fmt::Display,
    ) -> ConfigError {
        let (line, key) = match role {
            Some(r) => (w.role_lines[r as usize], r.key()),
            None => (w.binary_line.unwrap_or(w.header_line), "binary"),
        };
        ConfigError {
            path: self.path.clone(),
            line: Some(line),
            key: Some(key.to_string()),
            message: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"# two windows
[[window]]
name = "prices"
binary = "/usr/lib/libprices.so"
open = "Prices::reset"
close = "Prices::load"
access = "Prices::price"
object_arg = 1
miss_ret = -1

[[window]]
name = "rates"
open = "Rates::clear"
close = "Rates::fill"
access = "Rates::get"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("w.toml"), text)
    }

    /// The refusal of `text`, as racewatch prints it.
    fn refusal(text: &str) -> String {
        parse(text).expect_err("refused").to_string()
    }

    #[test]
    fn windows_with_their_defaults() {
        let c = parse(TWO).unwrap();
        let w: Vec<&Window> = c.windows.iter().map(|c| &c.window).collect();
        assert_eq!(
            *w[0],
            Window {
                name: "prices".into(),
                binary: Some("/usr/lib/libprices.so".into()),
                open: "Prices::reset".into(),
                close: "Prices::load".into(),
                access: "Prices::price".into(),
                object_arg: 1,
                miss_ret: Some(-1),
            }
        );
        assert_eq!(
            (w[1].binary.as_ref(), w[1].object_arg, w[1].miss_ret),
            (None, 0, None)
        );
        assert_eq!(c.windows[1].role_lines, [13, 14, 15]);
    }

    #[test]
    fn later_errors_name_the_line_of_their_key() {
        let c = parse(TWO).unwrap();
        let gone = "no function named `Rates::get`";
        assert_eq!(
            c.error(&c.windows[1], Some(Role::Access), gone).to_string(),
            format!("w.toml:15: key `access`: {gone}")
        );
        assert_eq!(
            c.error(&c.windows[0], None, "not there").to_string(),
            "w.toml:4: key `binary`: not there"
        );
        // Without `binary`, the window's header.
        assert_eq!(c.error(&c.windows[1], None, "x").line, Some(11));
    }

    #[test]
    fn an_unknown_key() {
        let text = TWO.replace("miss_ret = -1", "miss_value = -1");
        assert_eq!(
            refusal(&text),
            "w.toml:9: key `miss_value`: unknown field `miss_value`, expected one of `name`, \
             `binary`, `open`, `close`, `access`, `object_arg`, `miss_ret`"
        );
        let text = TWO.replace(
            "[[window]]\nname = \"rates\"",
            "[[windows]]\nname = \"rates\"",
        );
        assert!(refusal(&text).starts_with("w.toml:11: key `windows`: unknown field"));
    }

    #[test]
    fn a_value_of_the_wrong_type() {
        let text = TWO.replace("object_arg = 1", "object_arg = \"this\"");
        assert_eq!(
            refusal(&text),
            "w.toml:8: key `object_arg`: invalid type: string \"this\", expected u32"
        );
        let text = TWO.replace("miss_ret = -1", "miss_ret = 1.5");
        assert!(refusal(&text).starts_with("w.toml:9: key `miss_ret`: invalid type"));
        let text = TWO.replace("object_arg = 1", "object_arg = 6");
        assert_eq!(
            refusal(&text),
            "w.toml:8: key `object_arg`: 6 is not an argument racewatch reads: give 0 to 5"
        );
    }

    #[test]
    fn a_missing_key_names_its_table() {
        let text = TWO.replace("access = \"Rates::get\"\n", "");
        assert_eq!(
            refusal(&text),
            "w.toml:11: key `access`: missing field `access`"
        );
        assert_eq!(
            refusal(""),
            "w.toml:1: key `window`: missing field `window`"
        );
        assert_eq!(
            refusal("window = []"),
            "w.toml:1: key `window`: no window: give one [[window]] table each"
        );
    }

    #[test]
    fn a_duplicate_name_points_at_the_second() {
        let text = TWO.replace("name = \"rates\"", "name = \"prices\"");
        assert_eq!(
            refusal(&text),
            "w.toml:12: key `name`: the name \"prices\" is already the window's at line 3"
        );
        let text = TWO.replace("name = \"rates\"", "name = \"\"");
        assert_eq!(
            refusal(&text),
            "w.toml:12: key `name`: a window's name cannot be empty"
        );
    }

    #[test]
    fn text_that_is_not_toml() {
        let text = TWO.replace("\"Rates::fill\"", "Rates::fill");
        assert_eq!(
            refusal(&text),
            "w.toml:14: key `close`: string values must be quoted, expected literal string"
        );
        assert!(refusal("[[window]\n").starts_with("w.toml:1: "));
    }

    #[test]
    fn a_file_that_cannot_be_read() {
        let e = Config::read(Path::new("/nonexistent/w.toml")).unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (None, None));
        assert!(
            e.to_string()
                .starts_with("/nonexistent/w.toml: cannot read it: "),
            "{e}"
        );
    }
}
