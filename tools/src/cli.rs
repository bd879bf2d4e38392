//! `--key value` / `--flag` arguments, nothing more.

use std::collections::HashMap;
use std::str::FromStr;

use anyhow::{anyhow, bail, Result};

pub struct Args {
    values: HashMap<String, String>,
    used: std::cell::RefCell<Vec<String>>,
}

impl Args {
    pub fn parse(raw: &[String]) -> Result<Args> {
        let mut values = HashMap::new();
        let mut i = 0;
        while i < raw.len() {
            let Some(key) = raw[i].strip_prefix("--") else { bail!("unexpected argument {:?}", raw[i]) };
            if let Some((k, v)) = key.split_once('=') {
                values.insert(k.to_string(), v.to_string());
                i += 1;
            } else if i + 1 < raw.len() && !raw[i + 1].starts_with("--") {
                values.insert(key.to_string(), raw[i + 1].clone());
                i += 2;
            } else {
                values.insert(key.to_string(), "true".to_string());
                i += 1;
            }
        }
        Ok(Args { values, used: Default::default() })
    }

    pub fn opt<T: FromStr>(&self, key: &str) -> Result<Option<T>> {
        self.used.borrow_mut().push(key.to_string());
        match self.values.get(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| anyhow!("bad value for --{key}: {v:?}")),
        }
    }

    pub fn get<T: FromStr>(&self, key: &str, default: T) -> Result<T> {
        Ok(self.opt(key)?.unwrap_or(default))
    }

    pub fn req<T: FromStr>(&self, key: &str) -> Result<T> {
        self.opt(key)?.ok_or_else(|| anyhow!("--{key} is required"))
    }

    pub fn flag(&self, key: &str) -> bool {
        self.used.borrow_mut().push(key.to_string());
        matches!(self.values.get(key).map(String::as_str), Some("true" | "1" | "yes"))
    }

    /// Fails on options nobody asked for (typos).
    pub fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        let mut unknown: Vec<&String> = self.values.keys().filter(|k| !used.contains(k)).collect();
        unknown.sort();
        if !unknown.is_empty() {
            bail!("unknown option(s): {}", unknown.iter().map(|k| format!("--{k}")).collect::<Vec<_>>().join(" "));
        }
        Ok(())
    }
}
