//! Topics: the template giving the topic of an event without a per-row
//! topic, rendered from its aggregate and event types
//! (`outbox.event.{aggregate_type}`), and the allow-list every event's topic
//! must pass before it is published or created (`--allowed-topics`).

use crate::{Error, Result};

/// One piece of a topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    AggregateType,
    EventType,
}

/// The topic for events without a per-row topic, e.g. `outbox.event.{aggregate_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    segments: Vec<Segment>,
}

impl TopicTemplate {
    /// Parses a template; unknown placeholders and unbalanced braces are errors.
    pub fn parse(template: &str) -> Result<Self> {
        let bad = |why: String| Error::Config(format!("topic template `{template}`: {why}"));
        let mut segments = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            if let Some(open) = rest.find(['{', '}']) {
                if rest.as_bytes()[open] == b'}' {
                    return Err(bad("`}` without a matching `{`".into()));
                }
                if open > 0 {
                    segments.push(Segment::Literal(rest[..open].to_owned()));
                }
                let close = rest[open..]
                    .find('}')
                    .ok_or_else(|| bad("`{` without a matching `}`".into()))?;
                let name = &rest[open + 1..open + close];
                segments.push(match name {
                    "aggregate_type" => Segment::AggregateType,
                    "event_type" => Segment::EventType,
                    other => {
                        return Err(bad(format!(
                            "unknown placeholder `{{{other}}}`; use {{aggregate_type}} or {{event_type}}"
                        )));
                    }
                });
                rest = &rest[open + close + 1..];
            } else {
                segments.push(Segment::Literal(rest.to_owned()));
                rest = "";
            }
        }
        if segments.is_empty() {
            return Err(bad("the template is empty".into()));
        }
        for s in &segments {
            if let Segment::Literal(lit) = s
                && !lit
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
            {
                return Err(bad(format!(
                    "`{lit}` has characters Kafka topic names cannot contain (allowed: letters, digits, `.`, `_`, `-`)"
                )));
            }
        }
        Ok(Self { segments })
    }

    /// The pattern of every topic this template can give: each placeholder
    /// becomes `*` (`outbox.event.{aggregate_type}` → `outbox.event.*`).
    pub fn pattern(&self) -> String {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::AggregateType | Segment::EventType => {
                    if !out.ends_with('*') {
                        out.push('*');
                    }
                }
            }
        }
        out
    }

    /// The topic for one event.
    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::AggregateType => out.push_str(aggregate_type),
                Segment::EventType => out.push_str(event_type),
            }
        }
        out
    }
}

/// The topics events may be published to (and, with `--create-topics`,
/// created): rows choose their topic through `aggregate_type`, `event_type`
/// or the `topic` column, and without a limit a row could publish to another
/// service's topic, pose as a dead letter, or create topics without end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedTopics {
    /// Exact names or `*` globs; a topic passes when one matches.
    patterns: Vec<String>,
    /// Whether `patterns` is the template's (no `--allowed-topics` given).
    from_template: bool,
    /// Never allowed, whatever the patterns say: only dead letters go there.
    dead_letter_topic: String,
}

impl AllowedTopics {
    /// The allow-list from `--allowed-topics` (comma-separated names or
    /// globs, `*` matching any run of characters), or, when not given, the
    /// topics `template` can produce and nothing else.
    pub fn parse(
        list: Option<&str>,
        template: &TopicTemplate,
        dead_letter_topic: &str,
    ) -> Result<Self> {
        let Some(list) = list else {
            return Ok(Self {
                patterns: vec![template.pattern()],
                from_template: true,
                dead_letter_topic: dead_letter_topic.to_owned(),
            });
        };
        let mut patterns = Vec::new();
        for entry in list.split(',').map(str::trim) {
            if entry.is_empty() {
                return Err(Error::Config(format!(
                    "--allowed-topics `{list}` has an empty entry; give comma-separated topic names or patterns such as `outbox.event.*`"
                )));
            }
            if let Some(c) = entry
                .chars()
                .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*')))
            {
                return Err(Error::Config(format!(
                    "--allowed-topics entry `{}` has `{}`, which no Kafka topic name contains (allowed: letters, digits, `.`, `_`, `-`, and `*` as a wildcard)",
                    entry.escape_debug(),
                    c.escape_debug()
                )));
            }
            patterns.push(entry.to_owned());
        }
        Ok(Self {
            patterns,
            from_template: false,
            dead_letter_topic: dead_letter_topic.to_owned(),
        })
    }

    /// Whether a pattern lets rows pick any topic name (`*`, or a template
    /// that starts with a placeholder): worth a warning at start.
    pub fn is_open(&self) -> bool {
        self.patterns.iter().any(|p| p.starts_with('*'))
    }

    /// The patterns, comma-separated, for logs and errors.
    pub fn describe(&self) -> String {
        self.patterns.join(",")
    }

    /// Whether events may go to `topic`; if not, why (for the event's
    /// undeliverable error).
    pub fn check(&self, topic: &str) -> std::result::Result<(), String> {
        if topic == self.dead_letter_topic {
            return Err(format!(
                "its topic `{topic}` is the dead-letter topic, which only the relay's dead letters may use"
            ));
        }
        // Kafka's own topics (`__consumer_offsets`, `__transaction_state`)
        // and its ecosystem's (`_schemas` of Schema Registry, `_confluent-*`)
        // are never an event's, whatever a pattern such as `*` says.
        if topic.starts_with('_') {
            return Err(format!(
                "its topic `{topic}` starts with `_`, which Kafka and its tools (`__consumer_offsets`, \
                 `_schemas`) use for internal topics"
            ));
        }
        if self
            .patterns
            .iter()
            .any(|p| glob_matches(p.as_bytes(), topic.as_bytes()))
        {
            return Ok(());
        }
        Err(if self.from_template {
            format!(
                "its topic `{topic}` is not one --topic-template gives (`{}`), and no --allowed-topics was configured; \
                 add it with --allowed-topics (OUTBOX_ALLOWED_TOPICS), keeping `{}` in the list",
                self.describe(),
                self.describe()
            )
        } else {
            format!(
                "its topic `{topic}` is not in --allowed-topics (`{}`); add it there (OUTBOX_ALLOWED_TOPICS) or fix the row",
                self.describe()
            )
        })
    }
}

/// `*` matches any run of characters (none included); everything else
/// matches itself.
fn glob_matches(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and the name position it is matched up to:
    // on a mismatch, that star takes one more character.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_templates() {
        let t = TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap();
        assert_eq!(t.render("order", "Placed"), "outbox.event.order");
        let t = TopicTemplate::parse("{aggregate_type}-{event_type}").unwrap();
        assert_eq!(t.render("order", "Placed"), "order-Placed");
        for (bad, expect) in [
            ("outbox.{aggregate}", "unknown placeholder `{aggregate}`"),
            ("outbox.{aggregate_type", "without a matching `}`"),
            ("outbox}", "without a matching `{`"),
            (
                "out box.{aggregate_type}",
                "characters Kafka topic names cannot contain",
            ),
            ("", "empty"),
        ] {
            let err = TopicTemplate::parse(bad).unwrap_err().to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("outbox.event.*", "outbox.event.order", true),
            ("outbox.event.*", "outbox.event.", true),
            ("outbox.event.*", "outbox.events", false),
            ("orders.v1", "orders.v1", true),
            ("orders.v1", "orders.v10", false),
            ("*", "anything", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*-dlt", "orders-dlt", true),
            ("*.*.x", "a.b.c.x", true),
            ("**", "", true),
        ] {
            assert_eq!(glob_matches(p.as_bytes(), n.as_bytes()), want, "{p} {n}");
        }
    }

    #[test]
    fn the_default_allows_what_the_template_gives_and_nothing_else() {
        let t = TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap();
        assert_eq!(t.pattern(), "outbox.event.*");
        let a = AllowedTopics::parse(None, &t, "outbox.dead-letter").unwrap();
        assert!(a.check("outbox.event.order").is_ok());
        let err = a.check("payments.ledger").unwrap_err();
        assert!(
            err.contains("not one --topic-template gives (`outbox.event.*`)"),
            "{err}"
        );
        assert!(err.contains("--allowed-topics"), "{err}");
        let t = TopicTemplate::parse("{aggregate_type}{event_type}.v1").unwrap();
        assert_eq!(t.pattern(), "*.v1");
        // A template that can give any name still cannot give the dead-letter
        // topic or Kafka's own.
        let t = TopicTemplate::parse("{aggregate_type}").unwrap();
        let a = AllowedTopics::parse(None, &t, "outbox.dead-letter").unwrap();
        assert!(a.check("orders").is_ok());
        let err = a.check("outbox.dead-letter").unwrap_err();
        assert!(err.contains("is the dead-letter topic"), "{err}");
        for internal in ["__consumer_offsets", "_schemas", "_confluent-metrics"] {
            let err = a.check(internal).unwrap_err();
            assert!(err.contains("internal topics"), "{err}");
        }
        assert!(a.is_open());
        let t = TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap();
        assert!(!AllowedTopics::parse(None, &t, "dlt").unwrap().is_open());
    }

    #[test]
    fn a_configured_list_replaces_the_default() {
        let t = TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap();
        let a = AllowedTopics::parse(Some(" outbox.event.* , orders.v1"), &t, "dlt").unwrap();
        assert_eq!(a.describe(), "outbox.event.*,orders.v1");
        assert!(a.check("orders.v1").is_ok());
        assert!(a.check("outbox.event.x").is_ok());
        let err = a.check("orders.v2").unwrap_err();
        assert!(
            err.contains("is not in --allowed-topics (`outbox.event.*,orders.v1`)"),
            "{err}"
        );
        let a = AllowedTopics::parse(Some("orders.v1"), &t, "dlt").unwrap();
        assert!(a.check("outbox.event.x").is_err());
        for (bad, expect) in [
            ("a,,b", "empty entry"),
            ("a,", "empty entry"),
            ("orders/v1", "has `/`"),
            ("orders v1", "has ` `"),
        ] {
            let err = AllowedTopics::parse(Some(bad), &t, "dlt")
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }
}
