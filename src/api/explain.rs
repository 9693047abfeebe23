//! Names the fields of a request body, and the parameters, that poem-openapi refused.
//!
//! poem-openapi parses a body against the operation's schema but reports a missing or
//! mistyped field without its name ("Expected input type "string", found null. (occurred
//! while parsing "CreateProject")"). When that happens, [`explain`] walks the body against
//! the same schema from the served document and says which fields are wrong and how, as the
//! contract's `validationDetails`. It checks presence and JSON types only; the field rules
//! (lengths, patterns, ranges) are `validate`'s, and run only once a body parses.

use serde_json::Value;

use super::spec::Spec;
use crate::error::FieldError;

/// The fields of `body` that do not fit the body schema of `method` on `template` (or the
/// body itself, when it is not JSON), or none if the operation takes no JSON body or no field
/// is at fault (the parser's own message then stands).
pub fn explain(spec: &Spec, method: &str, template: &'static str, body: &[u8]) -> Vec<FieldError> {
    let mut out = Vec::new();
    let Some(schema) = spec.body_schema(method, template) else {
        return out;
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        out.push(FieldError::new("body", "is required (a JSON object)"));
        return out;
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => check(spec, &value, schema, "", &mut out),
        Err(e) => out.push(FieldError::new("body", format!("is not valid JSON ({e})"))),
    }
    out
}

/// A path or query parameter that did not parse: what it must be, from its schema (the
/// parser's reason when the schema does not say).
pub fn param(
    spec: &Spec,
    method: &str,
    template: &'static str,
    name: &str,
    reason: &str,
) -> FieldError {
    let schema = spec
        .param_schema(method, template, name)
        .map(|s| spec.resolve(s));
    // An enumeration (a query enum type) names its values: "must be asc or desc".
    let values: Option<Vec<&str>> = schema
        .and_then(|s| s.get("enum"))
        .and_then(Value::as_array)
        .map(|values| values.iter().filter_map(Value::as_str).collect());
    let ty = schema.and_then(|s| s.get("type")).and_then(Value::as_str);
    let message = match (values, ty.and_then(expected)) {
        (Some(values), _) if !values.is_empty() => format!("must be {}", one_of(&values)),
        (_, Some(e)) => format!("must be {e}"),
        _ => format!("is not valid ({reason})"),
    };
    FieldError::new(name, message)
}

/// `a`, `a or b`, `a, b or c`.
fn one_of(values: &[&str]) -> String {
    match values {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// How a JSON type reads in a message.
fn expected(ty: &str) -> Option<&'static str> {
    Some(match ty {
        "string" => "a string",
        "integer" => "an integer",
        "number" => "a number",
        "boolean" => "true or false",
        _ => return None,
    })
}

fn check(spec: &Spec, v: &Value, schema: &Value, path: &str, out: &mut Vec<FieldError>) {
    let schema = spec.resolve(schema);
    let field = if path.is_empty() { "body" } else { path };
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                out.push(mismatch(field, "an object", v));
                return;
            };
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for name in &required {
                if obj.get(*name).is_none_or(Value::is_null) {
                    out.push(FieldError::new(join(path, name), "is required"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties");
            for (name, value) in obj {
                let at = join(path, name);
                match (props.and_then(|p| p.get(name)), extra) {
                    (Some(_), _) if value.is_null() => {} // required ones are reported above
                    (Some(prop), _) => check(spec, value, prop, &at, out),
                    (None, Some(Value::Bool(false))) => {
                        out.push(FieldError::new(at, "is not a field of this request"))
                    }
                    (None, Some(items @ Value::Object(_))) => check(spec, value, items, &at, out),
                    (None, _) => {}
                }
            }
        }
        Some("array") => {
            let Some(items) = v.as_array() else {
                out.push(mismatch(field, "an array", v));
                return;
            };
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(spec, item, item_schema, &format!("{path}[{i}]"), out);
                }
            }
        }
        Some(t @ ("string" | "integer" | "number" | "boolean")) => {
            let fits = match t {
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                _ => v.is_boolean(),
            };
            let values: Option<Vec<&str>> = schema
                .get("enum")
                .and_then(Value::as_array)
                .map(|values| values.iter().filter_map(Value::as_str).collect());
            if !fits {
                out.push(mismatch(field, expected(t).unwrap_or("something else"), v));
            } else if let (Some(values), Some(s)) = (values, v.as_str()) {
                if !values.contains(&s) {
                    out.push(FieldError::new(
                        field,
                        format!("must be {}", one_of(&values)),
                    ));
                }
            }
        }
        _ => {}
    }
}

/// `field` must be `expected`, and `v` is not.
fn mismatch(field: &str, expected: &str, v: &Value) -> FieldError {
    FieldError::new(field, format!("must be {expected}, not {}", kind(v)))
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// How a JSON value reads in a message.
fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if n.is_i64() || n.is_u64() => format!("the integer {n}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Spec {
        let generated = json!({
            "paths": {"/api/projects": {"post": {"requestBody": {"content": {"application/json; charset=utf-8": {
                "schema": {"$ref": "#/components/schemas/CreateProject"}}}}}}},
            "components": {"schemas": {
                "CreateProject": {"type": "object", "required": ["name", "description"], "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "config": {"$ref": "#/components/schemas/ConfigIn"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "kind": {"type": "string", "enum": ["bash", "python"]},
                    "vars": {"type": "object", "additionalProperties": {"type": "string"}}
                }},
                "ConfigIn": {"type": "object", "properties": {"defaultMaxRetries": {"type": "integer"}}}
            }}
        });
        Spec::build(&generated.to_string())
    }

    fn fields(body: &str) -> Vec<(String, String)> {
        let spec = spec();
        let template = spec.route("GET", "/api/projects").0;
        explain(&spec, "POST", template, body.as_bytes())
            .into_iter()
            .map(|e| (e.field, e.message))
            .collect()
    }

    #[test]
    fn names_missing_and_mistyped_fields_at_any_depth() {
        assert_eq!(
            fields(r#"{"name": "x"}"#),
            [("description".into(), "is required".into())]
        );
        assert_eq!(
            fields(r#"{"name": 5, "description": null}"#),
            [
                ("description".into(), "is required".into()),
                ("name".into(), "must be a string, not the integer 5".into())
            ]
        );
        assert_eq!(
            fields(
                r#"{"name": "x", "description": "d", "config": {"defaultMaxRetries": 1.5},
                    "tags": ["a", 2], "vars": {"k": false}}"#
            ),
            [
                (
                    "config.defaultMaxRetries".into(),
                    "must be an integer, not the number 1.5".into()
                ),
                (
                    "tags[1]".into(),
                    "must be a string, not the integer 2".into()
                ),
                ("vars.k".into(), "must be a string, not false".into())
            ]
        );
        assert_eq!(
            fields("[1]"),
            [("body".into(), "must be an object, not an array".into())]
        );
        assert_eq!(
            fields(""),
            [("body".into(), "is required (a JSON object)".into())]
        );
        assert_eq!(
            fields("not json"),
            [(
                "body".into(),
                "is not valid JSON (expected ident at line 1 column 2)".into()
            )]
        );
    }

    #[test]
    fn names_the_values_of_an_enumeration() {
        assert_eq!(
            fields(r#"{"name": "x", "description": "d", "kind": "ruby"}"#),
            [("kind".into(), "must be bash or python".into())]
        );
        assert!(fields(r#"{"name": "x", "description": "d", "kind": "bash"}"#).is_empty());
    }

    #[test]
    fn says_nothing_when_it_cannot_tell() {
        assert!(fields(r#"{"name": "x", "description": "d"}"#).is_empty());
        let spec = spec();
        assert!(explain(&spec, "GET", spec.route("GET", "/api/projects").0, b"{}").is_empty());
    }
}
