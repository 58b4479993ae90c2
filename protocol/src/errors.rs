//! Printing an error with its causes on one line, `outer: cause: cause`, as `anyhow` prints with
//! `{:#}`: what the binaries print when they exit with an error and what the daemon logs, and
//! what tests compare against, so a typed error reads as an `anyhow` one did.

use std::fmt;

/// An error and its causes (`source()`, followed to the end) on one line, joined by ": ".
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the plan {path}")]
    struct Outer {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_chain_prints_each_cause_once_after_the_message() {
        let e = Outer { path: "plan.toml", source: std::io::Error::other("gone") };
        assert_eq!(Chain(&e).to_string(), "cannot read the plan plan.toml: gone");
        let plain = std::io::Error::other("alone");
        assert_eq!(Chain(&plain).to_string(), "alone");
    }
}
