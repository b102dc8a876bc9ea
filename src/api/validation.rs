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
/// Longest file name in a mount (a Secret key's limit, below the kernel's
/// 255 bytes).
pub const MAX_FILE_NAME_BYTES: usize = 253;
/// Default size of each node plugin volume's tmpfs (chart value
/// `node.volumeSizeLimit`, which feeds both the node plugin's `--tmpfs-size`
/// and the controller's `--volume-size-limit`).
pub const DEFAULT_VOLUME_SIZE_BYTES: u64 = 1024 * 1024;

/// The most file content (values plus file names) one volume may hold:
/// half its tmpfs, so that a rotation (old and new version side by side)
/// always fits. The node plugin refuses more at mount time; the controller
/// marks a grant that alone exceeds it `Invalid` / `ValueTooLarge`.
pub fn volume_payload_limit(volume_size_bytes: u64) -> u64 {
    volume_size_bytes / 2
}

/// Names starting with this are reserved for the atomic writer (`..data`,
/// its version directories and staging links), as kubelet reserves them.
pub const RESERVED_PREFIX: &str = "..";

/// True for names the atomic writer reserves (`..data`, version
/// directories): never a granted file.
pub fn is_reserved_name(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

/// Why a file name is not acceptable in a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidFileName {
    #[error("the name is empty")]
    Empty,
    #[error("the name is {len} bytes long; at most {MAX_FILE_NAME_BYTES} are allowed")]
    TooLong { len: usize },
    #[error("the name contains '/'; only a single file name is allowed")]
    ContainsSlash,
    #[error("the name contains a NUL byte")]
    ContainsNul,
    #[error("'.' and '..' are not file names")]
    DotOrDotDot,
    #[error("names starting with '..' are reserved for the atomic writer")]
    ReservedPrefix,
}

/// Checks that `name` is a single file name the writer may create: non-empty,
/// at most [`MAX_FILE_NAME_BYTES`] bytes, no `/` or NUL, not `.` or `..`, not starting with `..`.
pub fn validate_file_name(name: &str) -> Result<(), InvalidFileName> {
    if name.is_empty() {
        return Err(InvalidFileName::Empty);
    }
    if name.len() > MAX_FILE_NAME_BYTES {
        return Err(InvalidFileName::TooLong { len: name.len() });
    }
    if name.contains('/') {
        return Err(InvalidFileName::ContainsSlash);
    }
    if name.contains('\0') {
        return Err(InvalidFileName::ContainsNul);
    }
    if name == "." || name == ".." {
        return Err(InvalidFileName::DotOrDotDot);
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Err(InvalidFileName::ReservedPrefix);
    }
    Ok(())
}

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
    validate_file_name(name).map_err(|reason| match reason {
        InvalidFileName::Empty => NameError::Empty,
        InvalidFileName::TooLong { .. } => NameError::TooLong(name.to_owned()),
        InvalidFileName::ContainsSlash | InvalidFileName::ContainsNul => {
            NameError::Separator(name.to_owned())
        }
        InvalidFileName::DotOrDotDot | InvalidFileName::ReservedPrefix => {
            NameError::Reserved(name.to_owned())
        }
    })
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

/// RFC 1123 label as Kubernetes uses it: at most 63 characters of `a-z`,
/// `0-9` and `-`, starting and ending with an alphanumeric character.
pub fn is_dns1123_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || *byte == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// RFC 1123 subdomain as Kubernetes uses it: at most 253 characters,
/// dot-separated labels of `a-z`, `0-9` and `-`, each starting and ending
/// with an alphanumeric character.
pub fn is_dns1123_subdomain(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || *byte == b'-')
                && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        })
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
