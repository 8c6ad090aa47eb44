//! Repository policy: `[[policy]]` rules of glob patterns over
//! `upstream/repository`, tried in file order; the first rule with a
//! matching pattern decides. When none matches, the repository is allowed,
//! unless some rule is an allow list: then only what is allowed gets
//! through. Pure: no I/O.
//!
//! Patterns: `*` matches within one path component, `**` across
//! components, `?` one character other than `/`; everything else is literal.

use crate::config::{Effect, PolicyRule};

pub struct Policy {
    rules: Vec<PolicyRule>,
    /// Some rule is an allow list, so an unmatched repository is denied.
    default_deny: bool,
}

impl Policy {
    pub fn new(rules: Vec<PolicyRule>) -> Policy {
        Policy {
            default_deny: rules.iter().any(|r| r.effect == Effect::Allow),
            rules,
        }
    }

    /// `Err` carries the reason, naming the rule that denied.
    pub fn check(&self, upstream: &str, repo: &str) -> Result<(), String> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let subject = format!("{upstream}/{repo}");
        for rule in &self.rules {
            if let Some(pattern) = rule.patterns.iter().find(|p| glob_matches(p, &subject)) {
                return match rule.effect {
                    Effect::Allow => Ok(()),
                    Effect::Deny => Err(format!(
                        "{subject} is denied by policy rule {:?} (pattern {pattern:?})",
                        rule.name
                    )),
                };
            }
        }
        if self.default_deny {
            Err(format!(
                "{subject} is not in any allow rule of the pull policy"
            ))
        } else {
            Ok(())
        }
    }
}

/// Whether `pattern` is a usable glob: lowercase name characters, `/`
/// between non-empty components, and wildcards.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.len() > 512 {
        return Err("must be 1 to 512 characters".into());
    }
    if let Some(bad) = pattern
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/*?:".contains(*c)))
    {
        return Err(format!(
            "{bad:?} cannot occur in a repository name (names are lowercase)"
        ));
    }
    if pattern.split('/').any(str::is_empty) {
        return Err("empty path component (leading, trailing or double '/')".into());
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    Literal(u8),
    AnyChar,
    Star,
    DoubleStar,
}

fn tokens(pattern: &str) -> Vec<Token> {
    let bytes = pattern.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        out.push(match bytes[i] {
            b'*' if bytes.get(i + 1) == Some(&b'*') => {
                i += 1;
                Token::DoubleStar
            }
            b'*' => Token::Star,
            b'?' => Token::AnyChar,
            b => Token::Literal(b),
        });
        i += 1;
    }
    out
}

/// Glob match by dynamic programming over (pattern token, text position):
/// linear space, no backtracking blow-up whatever the pattern.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let text = text.as_bytes();
    // reachable[j]: the tokens so far can match text[..j].
    let mut reachable = vec![false; text.len() + 1];
    reachable[0] = true;
    for token in tokens(pattern) {
        let mut next = vec![false; text.len() + 1];
        for j in 0..=text.len() {
            match token {
                Token::Star | Token::DoubleStar => {
                    // Zero characters, or one more than a reachable shorter match.
                    next[j] = reachable[j]
                        || (j > 0
                            && next[j - 1]
                            && (token == Token::DoubleStar || text[j - 1] != b'/'));
                }
                Token::AnyChar => next[j] = j > 0 && reachable[j - 1] && text[j - 1] != b'/',
                Token::Literal(b) => next[j] = j > 0 && reachable[j - 1] && text[j - 1] == b,
            }
        }
        reachable = next;
    }
    reachable[text.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, effect: Effect, patterns: &[&str]) -> PolicyRule {
        PolicyRule {
            name: name.into(),
            effect,
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn globs() {
        assert!(glob_matches(
            "docker.io/library/*",
            "docker.io/library/alpine"
        ));
        assert!(!glob_matches(
            "docker.io/library/*",
            "docker.io/library/a/b"
        ));
        assert!(glob_matches("docker.io/**", "docker.io/library/a/b"));
        assert!(glob_matches("**", "anything/at/all"));
        assert!(glob_matches("*/library/alpine", "ghcr.io/library/alpine"));
        assert!(glob_matches("ghcr.io/org/app-?", "ghcr.io/org/app-1"));
        assert!(!glob_matches("ghcr.io/org/app-?", "ghcr.io/org/app-12"));
        assert!(glob_matches("quay.io/*/*-test", "quay.io/a/b-test"));
        assert!(!glob_matches("quay.io/*/*-test", "quay.io/a/b-tests"));
        assert!(glob_matches("a/**/z", "a/b/c/z"));
        assert!(glob_matches("a/**/z", "a//z"));
        assert!(!glob_matches("a", "ab"));
        // Many stars stay cheap.
        let pattern = "*".repeat(200) + "x";
        assert!(!glob_matches(&pattern, &"a".repeat(250)));
    }

    #[test]
    fn first_matching_rule_decides() {
        let policy = Policy::new(vec![
            rule("no-test", Effect::Deny, &["docker.io/*/test-*"]),
            rule("hub", Effect::Allow, &["docker.io/**"]),
        ]);
        assert!(policy.check("docker.io", "library/alpine").is_ok());
        let denied = policy.check("docker.io", "team/test-x").unwrap_err();
        assert!(denied.contains("\"no-test\""), "{denied}");
        let unlisted = policy.check("ghcr.io", "org/app").unwrap_err();
        assert!(unlisted.contains("not in any allow rule"), "{unlisted}");
        let deny_only = Policy::new(vec![rule("x", Effect::Deny, &["ghcr.io/evil/*"])]);
        assert!(deny_only.check("ghcr.io", "good/app").is_ok());
        assert!(deny_only.check("ghcr.io", "evil/app").is_err());
        assert!(Policy::new(vec![]).check("a", "b").is_ok());
    }

    #[test]
    fn pattern_checks() {
        assert!(check_pattern("docker.io/library/*").is_ok());
        assert!(check_pattern("Docker.io/x").is_err());
        assert!(check_pattern("docker.io//x").is_err());
        assert!(check_pattern("/x").is_err());
        assert!(check_pattern("").is_err());
    }
}
