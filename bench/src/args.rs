//! A small command-line parser: `--flag value`, `--flag=value`, bare `--switch`, and `--tls`,
//! which takes three values. Each subcommand names the flags it accepts, so a misspelt flag is
//! an error rather than silently ignored.

use std::collections::HashMap;
use std::str::FromStr;

/// Flags of one subcommand, by name (without the leading dashes).
#[derive(Debug, Default)]
pub struct Args {
    values: HashMap<String, Vec<String>>,
}

/// How many values a flag takes.
fn arity(name: &str) -> usize {
    match name {
        "tls" => 3,
        "help" | "with-finished" | "resume" => 0,
        _ => 1,
    }
}

impl Args {
    /// Parses `args` (the words after the subcommand), accepting only the flags in `allowed`.
    pub fn parse(args: &[String], allowed: &[&str]) -> Result<Args, String> {
        let mut values: HashMap<String, Vec<String>> = HashMap::new();
        let mut i = 0;
        while i < args.len() {
            let word = &args[i];
            let Some(flag) = word.strip_prefix("--") else {
                return Err(format!("unexpected argument {word:?}"));
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (flag.to_string(), None),
            };
            if !allowed.contains(&name.as_str()) && name != "help" {
                return Err(format!(
                    "unknown flag --{name} (accepted here: {})",
                    allowed
                        .iter()
                        .map(|a| format!("--{a}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            let mut got = Vec::new();
            if let Some(v) = inline {
                got.push(v);
            }
            while got.len() < arity(&name) {
                i += 1;
                match args.get(i) {
                    Some(v) if !v.starts_with("--") => got.push(v.clone()),
                    _ => return Err(format!("--{name} needs {} value(s)", arity(&name))),
                }
            }
            values.insert(name, got);
            i += 1;
        }
        Ok(Args { values })
    }

    /// Whether the flag was given.
    pub fn has(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// The flag's (first) value, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// All values of a multi-value flag (`--tls CERT KEY CA`).
    pub fn get_all(&self, name: &str) -> Option<&[String]> {
        self.values.get(name).map(Vec::as_slice)
    }

    /// The flag's value; an error naming the flag if it is missing.
    pub fn required(&self, name: &str) -> Result<&str, String> {
        self.get(name)
            .ok_or_else(|| format!("--{name} is required"))
    }

    /// The flag's value parsed as `T`, or `default` when the flag is absent.
    pub fn parse_or<T: FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| format!("--{name}: {text:?} is not a valid value")),
        }
    }
}

/// Parses a byte size: a plain number, or one with a K/M/G (binary) suffix: `64M`, `256MiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{text:?} is not a size (examples: 65536, 64M, 256MiB, 1G)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_values_and_the_three_value_tls_flag() {
        let a = Args::parse(
            &words("--mode echo --listen=127.0.0.1:1 --tls c k ca"),
            &["mode", "listen", "tls"],
        )
        .unwrap();
        assert_eq!(a.get("mode"), Some("echo"));
        assert_eq!(a.get("listen"), Some("127.0.0.1:1"));
        assert_eq!(a.get_all("tls").unwrap(), ["c", "k", "ca"]);
        assert!(!a.has("threads"));
    }

    #[test]
    fn switches_take_no_value() {
        let a = Args::parse(
            &words("--resume --threads 2 --with-finished"),
            &["resume", "threads", "with-finished"],
        )
        .unwrap();
        assert!(a.has("resume"));
        assert_eq!(a.get("resume"), None);
        assert_eq!(a.get("threads"), Some("2"));
        assert!(a.has("with-finished"));
    }

    #[test]
    fn unknown_flags_and_missing_values_are_errors() {
        assert!(Args::parse(&words("--nope 1"), &["mode"])
            .unwrap_err()
            .contains("--nope"));
        assert!(Args::parse(&words("--mode"), &["mode"])
            .unwrap_err()
            .contains("needs"));
        assert!(Args::parse(&words("--tls a b"), &["tls"]).is_err());
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert!(parse_size("lots").is_err());
    }
}
