//! Client credentials from an htpasswd file of bcrypt entries, as
//! `htpasswd -B` writes them. Parsing reports the line of every problem;
//! checking a password is deliberately slow (bcrypt), so callers cache
//! successes. Never logs or keeps a password.

use std::collections::HashMap;
use std::path::Path;

pub struct Htpasswd {
    users: HashMap<String, String>,
}

// Hand-written so hashes never reach a log line.
impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Htpasswd")
            .field("users", &self.users.len())
            .finish()
    }
}

/// Checked for unknown users too, so a reply takes as long whether or not
/// the user exists. Cost 5, as `htpasswd -B` writes by default.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        bcrypt::hash_with_salt("", 5, [0; 16])
            .map(|h| h.format_for_version(bcrypt::Version::TwoY))
            .unwrap_or_default()
    })
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Htpasswd, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Htpasswd::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// `user:hash` per line; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {n}: expected USER:HASH"));
            };
            if user.is_empty() {
                return Err(format!("line {n}: empty user name"));
            }
            if !["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
                return Err(format!(
                    "line {n}: user {user:?}: only bcrypt entries are supported (create them with `htpasswd -B`)"
                ));
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(format!("line {n}: user {user:?} appears twice"));
            }
        }
        Ok(Htpasswd { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s. Slow on purpose: run it off the runtime.
    pub fn verify(&self, user: &str, password: &str) -> Result<(), Mismatch> {
        match self.users.get(user) {
            Some(hash) => match bcrypt::verify(password, hash) {
                Ok(true) => Ok(()),
                Ok(false) => Err(Mismatch::WrongPassword),
                Err(_) => Err(Mismatch::BadEntry),
            },
            None => {
                let _ = bcrypt::verify(password, dummy_hash());
                Err(Mismatch::UnknownUser)
            }
        }
    }
}

/// Why a login failed, for the log line (the client only hears "invalid").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    UnknownUser,
    WrongPassword,
    /// The stored hash is not valid bcrypt.
    BadEntry,
}

impl Mismatch {
    pub fn as_str(self) -> &'static str {
        match self {
            Mismatch::UnknownUser => "unknown user",
            Mismatch::WrongPassword => "wrong password",
            Mismatch::BadEntry => "the user's htpasswd entry is not valid bcrypt",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_verifies_bcrypt_entries() {
        let hash = bcrypt::hash_with_salt("s3cret", 4, [7; 16])
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY);
        let file = Htpasswd::parse(&format!("# users\n\nalice:{hash}\n")).unwrap();
        assert_eq!(file.len(), 1);
        assert_eq!(file.verify("alice", "s3cret"), Ok(()));
        assert_eq!(file.verify("alice", "guess"), Err(Mismatch::WrongPassword));
        assert_eq!(file.verify("bob", "s3cret"), Err(Mismatch::UnknownUser));
    }

    #[test]
    fn names_the_line_of_each_problem() {
        let err = Htpasswd::parse("alice:$apr1$abc$def\n").unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("htpasswd -B"),
            "{err}"
        );
        let err = Htpasswd::parse("\nnocolon\n").unwrap_err();
        assert!(err.starts_with("line 2"), "{err}");
        let err = Htpasswd::parse("a:$2y$05$x\na:$2y$05$y\n").unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }
}
