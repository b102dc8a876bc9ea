//! Rules for Secret keys and mount file names, shared by the CRD schema (as
//! patterns and CEL rules the API server enforces) and the controller (which
//! checks again, for objects stored before a schema change).

/// A Secret data key, as the API server validates them (`IsConfigMapKey`).
pub const SECRET_KEY_PATTERN: &str = "^[-._a-zA-Z0-9]+$";
/// A file name inside the mount: one path element, no slash.
pub const FILE_NAME_PATTERN: &str = "^[^/\\x00]+$";
/// CEL rule for names: `.`/`..` would escape or shadow the mount, and names
/// starting with `..` are reserved for the atomic writer's `..data` links.
pub const FILE_NAME_CEL: &str = "self != '.' && !self.startsWith('..')";
pub const FILE_NAME_CEL_MESSAGE: &str =
    "must be a single file name: not '.' or '..', not starting with '..' (reserved)";
/// Longest file name most Linux filesystems (and tmpfs) accept.
pub const MAX_FILE_NAME_BYTES: usize = 253;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name {0:?} is longer than {MAX_FILE_NAME_BYTES} bytes")]
    TooLong(String),
    #[error("name {0:?} contains '/' or a NUL byte: it must be a single file name")]
    Separator(String),
    #[error("name {0:?} is '.', '..' or starts with '..' (reserved for the atomic writer)")]
    Reserved(String),
    #[error("secret key {0:?} may only contain letters, digits, '-', '_' and '.'")]
    KeyCharacters(String),
}

/// Checks a file name for the mount, the same way the schema does.
pub fn check_file_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_FILE_NAME_BYTES {
        return Err(NameError::TooLong(name.to_owned()));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(NameError::Separator(name.to_owned()));
    }
    if name == "." || name.starts_with("..") {
        return Err(NameError::Reserved(name.to_owned()));
    }
    Ok(())
}

/// Checks a Secret data key: the Secret key rules plus the file-name rules,
/// since a key is also the default file name.
pub fn check_secret_key(key: &str) -> Result<(), NameError> {
    check_file_name(key)?;
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(NameError::KeyCharacters(key.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["api-key", "SUPABASE_KEY", ".env", "a.b", "x..y"] {
            assert_eq!(check_file_name(ok), Ok(()), "{ok}");
            assert_eq!(check_secret_key(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_traversal_and_reserved_names() {
        assert_eq!(check_file_name(""), Err(NameError::Empty));
        assert!(matches!(
            check_file_name("a/b"),
            Err(NameError::Separator(_))
        ));
        assert!(matches!(
            check_file_name("../x"),
            Err(NameError::Separator(_))
        ));
        for reserved in [".", "..", "..data", "..x"] {
            assert!(matches!(
                check_file_name(reserved),
                Err(NameError::Reserved(_))
            ));
        }
        assert!(matches!(
            check_file_name(&"a".repeat(254)),
            Err(NameError::TooLong(_))
        ));
    }

    #[test]
    fn secret_keys_use_the_kubernetes_alphabet() {
        assert!(matches!(
            check_secret_key("key with space"),
            Err(NameError::KeyCharacters(_))
        ));
        assert!(matches!(
            check_secret_key("ключ"),
            Err(NameError::KeyCharacters(_))
        ));
    }
}
