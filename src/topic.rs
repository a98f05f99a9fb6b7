//! Kafka topic name rules, shared by the write helper (for per-row topic
//! overrides) and the relay (for names produced by its topic template).

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Checks a topic name against Kafka's rules: 1 to 249 characters from
/// `[a-zA-Z0-9._-]`, and not `.` or `..`. Returns why a name is refused.
pub fn validate(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("a topic name must not be empty");
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err("a topic name must be at most 249 characters");
    }
    if name == "." || name == ".." {
        return Err("`.` and `..` are not legal topic names");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err("a topic name may only contain ASCII letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_legal_names() {
        assert_eq!(validate("outbox.event.order"), Ok(()));
        assert_eq!(validate("a-b_c.D9"), Ok(()));
        assert_eq!(validate(&"x".repeat(249)), Ok(()));
    }

    #[test]
    fn refuses_illegal_names() {
        assert!(validate("").is_err());
        assert!(validate(".").is_err());
        assert!(validate("..").is_err());
        assert!(validate("has space").is_err());
        assert!(validate("slash/name").is_err());
        assert!(validate("ünïcode").is_err());
        assert!(validate(&"x".repeat(250)).is_err());
    }
}
