//! Property-based tests: request parsing, template rendering, the validators, and the lease
//! state machine against a plain model.

use std::collections::BTreeMap;

use agentq::api::types::{CreateProject, CreateTask, Text};
use agentq::api::validate;
use agentq::lease::{self, LeaseError};
use agentq::model::{render_template, template_placeholders, Rules, Task, TaskStatus};
use poem_openapi::types::ParseFromJSON;
use proptest::prelude::*;
use serde_json::Value;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("id".to_string()),
                    Just("typeId".to_string()),
                    Just("instructions".to_string()),
                    Just("variables".to_string()),
                    Just("priority".to_string()),
                    Just("notBefore".to_string()),
                    Just("name".to_string()),
                    Just("description".to_string()),
                    "[a-z]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.chars().count() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any JSON at all parses into a request type or fails cleanly; what parses validates or
    /// fails cleanly. Nothing panics.
    #[test]
    fn request_bodies_never_panic(v in json_value()) {
        if let Ok(t) = CreateTask::parse_from_json(Some(v.clone())) {
            let _ = validate::create_task(t, None, "");
        }
        if let Ok(p) = CreateProject::parse_from_json(Some(v.clone())) {
            let _ = validate::create_project(p);
        }
        let _ = Text::parse_from_json(Some(v));
    }

    /// Strings are only ever taken from JSON strings.
    #[test]
    fn text_takes_strings_only(v in json_value()) {
        let parsed = Text::parse_from_json(Some(v.clone()));
        prop_assert_eq!(parsed.is_ok(), v.is_string());
    }

    /// Project names pass exactly when they follow the rule.
    #[test]
    fn project_name_rule(name in prop_oneof![".{0,120}", "[A-Za-z0-9_-]{0,110}"]) {
        let body = CreateProject::parse_from_json(Some(serde_json::json!({
            "name": name, "description": "d"
        }))).ok().expect("parses");
        prop_assert_eq!(validate::create_project(body).is_ok(), name_ok(&name));
    }

    /// Priority passes exactly in 0-10.
    #[test]
    fn priority_rule(p in -5i64..20) {
        let body = CreateTask::parse_from_json(Some(serde_json::json!({
            "instructions": "x", "priority": p
        }))).ok().expect("parses");
        prop_assert_eq!(validate::create_task(body, None, "").is_ok(), (0..=10).contains(&p));
    }

    /// Rendering replaces every placeholder by its value and keeps the text around them.
    #[test]
    fn templates_render_every_placeholder(
        parts in prop::collection::vec(("[^{}]{0,10}", "[a-z][a-z0-9_]{0,6}"), 0..6),
        tail in "[^{}]{0,10}",
        value in "[^{}]{0,10}",
    ) {
        let mut template = String::new();
        let mut expected = String::new();
        let mut vars = BTreeMap::new();
        for (text, var) in &parts {
            template.push_str(text);
            template.push_str(&format!("{{{{{var}}}}}"));
            expected.push_str(text);
            expected.push_str(&format!("{value}-{var}"));
            vars.insert(var.clone(), format!("{value}-{var}"));
        }
        template.push_str(&tail);
        expected.push_str(&tail);
        prop_assert_eq!(render_template(&template, &vars), expected);
        for p in template_placeholders(&template) {
            prop_assert!(vars.contains_key(&p));
        }
    }

    /// Arbitrary templates never panic, with or without values.
    #[test]
    fn any_template_renders(t in ".{0,60}", v in ".{0,10}") {
        let mut vars = BTreeMap::new();
        for p in template_placeholders(&t) {
            vars.insert(p, v.clone());
        }
        let _ = render_template(&t, &vars);
        let _ = render_template(&t, &BTreeMap::new());
    }
}

/// The token a complete sends.
#[derive(Debug, Clone, Copy)]
enum Token {
    None,
    /// The agent's own: its lease's, or the one the task was completed under.
    Known,
    /// The token of the task's first lease (a stalled process's, once there were others).
    First,
}

#[derive(Debug, Clone)]
enum Op {
    Claim(u8),
    Complete(u8, Token),
    Fail(u8, bool),
    Extend(u8),
    Cancel,
    Retry,
    Advance(u16),
    Reclaim,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3).prop_map(Op::Claim),
        (
            0u8..3,
            prop_oneof![Just(Token::None), Just(Token::Known), Just(Token::First)]
        )
            .prop_map(|(a, t)| Op::Complete(a, t)),
        (0u8..3, any::<bool>()).prop_map(|(a, r)| Op::Fail(a, r)),
        (0u8..3).prop_map(Op::Extend),
        Just(Op::Cancel),
        Just(Op::Retry),
        (0u16..200).prop_map(Op::Advance),
        Just(Op::Reclaim),
    ]
}

/// What the model knows: status, holder and lease token, counts.
#[derive(Debug, Default)]
struct Model {
    holder: Option<(String, u128)>,
    /// The agent and token of the lease that completed the task, while it is completed.
    completed: Option<(String, u128)>,
    first_token: Option<u128>,
    /// The agent whose fail ended the last lease, until the next claim.
    failed: Option<String>,
    claims: u32,
    retries: u32,
}

fn new_task(max_retries: u32) -> Task {
    Task {
        max_retries,
        ..Task::queued(1, "t".into(), 1, 0)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Random sequences of protocol calls keep the invariants of `crate::lease`: a lease iff
    /// running, only the holder (and its token) acts, no lease ends before its time, one
    /// attempt per claim, retries never above the maximum.
    #[test]
    fn lease_state_machine_matches_the_model(ops in prop::collection::vec(op(), 1..40), max in 0u32..3) {
        let rules = Rules { lease_ms: 100, retry_delay_seconds: 0.0, backoff_multiplier: 2.0 };
        let mut t = new_task(max);
        let mut m = Model::default();
        let mut now = 0i64;
        let mut next_token = 1u128;
        for op in ops {
            let agent = |a: u8| format!("agent{a}");
            match op {
                Op::Claim(a) => {
                    if t.status == TaskStatus::Queued && !t.delayed {
                        lease::claim(&mut t, &agent(a), next_token, &rules, now);
                        let token = lease::token(m.claims + 1, next_token);
                        m.holder = Some((agent(a), token));
                        m.failed = None;
                        m.first_token.get_or_insert(token);
                        m.claims += 1;
                        next_token += 1;
                    }
                }
                Op::Complete(a, sent) => {
                    let token = match sent {
                        Token::None => None,
                        Token::Known => {
                            Some(m.holder.as_ref().or(m.completed.as_ref()).map_or(0, |h| h.1))
                        }
                        Token::First => Some(m.first_token.unwrap_or(0)),
                    };
                    let was_holder = m.holder.as_ref().is_some_and(|h| h.0 == agent(a));
                    let before = t.status;
                    let r = lease::complete(&mut t, &agent(a), token, None, None, now);
                    let holds = m.holder.as_ref().is_some_and(|h| token.is_none_or(|t| t == h.1));
                    if was_holder && before == TaskStatus::Running && holds {
                        prop_assert!(r.is_ok());
                        m.completed = m.holder.take();
                    } else if let Some((by, by_token)) = &m.completed {
                        // A repeat: the completing agent, with no token or with its own.
                        let repeat = *by == agent(a) && token.is_none_or(|t| t == *by_token);
                        prop_assert_eq!(r.is_ok(), repeat);
                    } else {
                        prop_assert!(matches!(r, Err(LeaseError::LeaseLost(_))));
                    }
                }
                Op::Fail(a, can_retry) => {
                    let was_holder = m.holder.as_ref().is_some_and(|h| h.0 == agent(a));
                    let before = t.clone();
                    let r = lease::fail(&mut t, &agent(a), None, "e".into(), can_retry, &rules, now);
                    if was_holder {
                        let will = r.unwrap();
                        prop_assert_eq!(will, can_retry && m.retries < max);
                        m.retries += will as u32;
                        m.holder = None;
                        m.failed = Some(agent(a));
                    } else if m.failed == Some(agent(a)) {
                        // A repeat of that fail: its answer as the task stands, nothing changed.
                        prop_assert_eq!(r, Ok(t.status == TaskStatus::Queued));
                        prop_assert_eq!(&t, &before);
                    } else {
                        prop_assert!(r.is_err());
                    }
                }
                Op::Extend(a) => {
                    let before = t.lease.as_ref().map(|l| l.expires_at);
                    let r = lease::extend(&mut t, &agent(a), None, 50, now);
                    if r.is_ok() {
                        prop_assert!(t.lease.as_ref().map(|l| l.expires_at) >= before);
                    }
                }
                Op::Cancel => {
                    if lease::cancel(&mut t, None, now).is_ok() {
                        m.holder = None;
                    }
                }
                Op::Retry => {
                    if lease::retry(&mut t, now).is_ok() {
                        m.completed = None;
                    }
                }
                Op::Advance(ms) => now += ms as i64,
                Op::Reclaim => {
                    let expiry = t.lease.as_ref().map(|l| l.expires_at);
                    match lease::reclaim(&mut t, &rules, now) {
                        Some(will) => {
                            prop_assert!(expiry.is_some_and(|e| e <= now), "reclaimed early");
                            m.retries += will as u32;
                            m.holder = None;
                        }
                        None => prop_assert!(expiry.is_none_or(|e| e > now)),
                    }
                }
            }
            // The invariants, after every step.
            prop_assert_eq!(t.lease.is_some(), t.status == TaskStatus::Running);
            prop_assert_eq!(
                t.lease.as_ref().map(|l| (l.agent.clone(), l.token)),
                m.holder.clone()
            );
            prop_assert_eq!(t.attempts.len() as u32, m.claims);
            prop_assert!(t.retry_count <= max);
            prop_assert_eq!(t.retry_count, m.retries);
            let open = t.attempts.iter().filter(|a| a.outcome == agentq::model::Outcome::Running).count();
            prop_assert_eq!(open, (t.status == TaskStatus::Running) as usize);
        }
    }
}
