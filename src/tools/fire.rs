//! `qualia-webhook fire`: sends Qualia's six sample notifications and the
//! invalid cases to a running service and checks every answer.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::activity::ActivityType;

/// One request and the statuses that count as a pass.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub body: Value,
    pub auth: Auth,
    pub expect: &'static [u16],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Given,
    None,
    WrongPassword,
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub case: Case,
    pub status: Option<u16>,
    pub elapsed: Duration,
    pub error: Option<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.status.is_some_and(|s| self.case.expect.contains(&s))
    }
}

/// A fresh id in Qualia's style: 17 characters.
fn fresh_id() -> String {
    let u = ulid::Ulid::generate().to_string();
    u[u.len() - 17..].to_owned()
}

pub fn sample(t: ActivityType, order_id: &str) -> Value {
    let description = match t {
        ActivityType::OrderRequest => {
            "You've received an order for a Title Search Plus in San Francisco County, California."
        }
        ActivityType::OrderCancelled => "Boston Legal has cancelled order #TEST-2018-1.",
        ActivityType::OrderCompleted => "Boston Legal has accepted order #TEST-2018-1.",
        ActivityType::OrderRevisionRequested => {
            "Boston Legal has requested a change on order #TEST-2018-1."
        }
        ActivityType::Message => "Marty McFly sent you a message.",
        ActivityType::Documents => {
            "Boston Legal has sent you additional documents on order #TEST-2018-1"
        }
    };
    let mut v = json!({"description": description, "type": t.as_str(), "order_id": order_id});
    if t == ActivityType::Message {
        v["message_id"] = json!(fresh_id());
    }
    v
}

/// The cases to send: the samples of `only` (or all six), and, when all are
/// sent, the invalid ones.
pub fn cases(order_id: Option<&str>, only: Option<ActivityType>) -> Vec<Case> {
    let order = order_id.map(str::to_owned).unwrap_or_else(fresh_id);
    let mut cases: Vec<Case> = ActivityType::ALL
        .into_iter()
        .filter(|t| only.is_none_or(|o| o == *t))
        .map(|t| Case {
            name: t.as_str().to_owned(),
            body: sample(t, &order),
            auth: Auth::Given,
            expect: &[200],
        })
        .collect();
    if only.is_some() {
        return cases;
    }
    let invalid: [(&str, Value); 4] = [
        (
            "invalid: missing order_id",
            json!({"type": "order_request", "description": "no order id"}),
        ),
        (
            "invalid: missing type",
            json!({"order_id": order, "description": "no type"}),
        ),
        (
            "invalid: unknown type",
            json!({"type": "order_exploded", "order_id": order}),
        ),
        (
            "invalid: blank order_id",
            json!({"type": "order_request", "order_id": "   "}),
        ),
    ];
    cases.extend(invalid.into_iter().map(|(name, body)| Case {
        name: name.to_owned(),
        body,
        auth: Auth::Given,
        expect: &[400, 422],
    }));
    let valid = sample(ActivityType::Documents, &order);
    cases.push(Case {
        name: "auth: none".into(),
        body: valid.clone(),
        auth: Auth::None,
        expect: &[401],
    });
    cases.push(Case {
        name: "auth: wrong password".into(),
        body: valid,
        auth: Auth::WrongPassword,
        expect: &[401],
    });
    cases
}

/// `http://host:port` or a full URL: the ingest URL.
pub fn ingest_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("--url {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("--url {url:?}: use http:// or https://"));
    }
    if parsed.path() == "/" || parsed.path().is_empty() {
        Ok(format!("{}webhook/activity", parsed.as_str()))
    } else {
        Ok(parsed.to_string())
    }
}

/// Sends every case in order and returns the outcomes.
pub async fn fire(
    url: &str,
    username: &str,
    password: &str,
    cases: Vec<Case>,
    timeout: Duration,
) -> Result<Vec<Outcome>, String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let wrong = format!("{password}-not");
    let mut outcomes = Vec::with_capacity(cases.len());
    for case in cases {
        let mut req = client.post(url).json(&case.body);
        req = match case.auth {
            Auth::Given => req.basic_auth(username, Some(password)),
            Auth::WrongPassword => req.basic_auth(username, Some(&wrong)),
            Auth::None => req,
        };
        let started = Instant::now();
        let (status, error) = match req.send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                let body = res.text().await.unwrap_or_default();
                let detail = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned));
                (Some(status), detail)
            }
            Err(e) => (None, Some(crate::http::error::chain(&e))),
        };
        outcomes.push(Outcome {
            case,
            status,
            elapsed: started.elapsed(),
            error,
        });
    }
    Ok(outcomes)
}

/// The table and the summary line (`N passed, M failed`).
pub fn report(outcomes: &[Outcome]) -> String {
    let mut out = format!(
        "{:<28} {:<9} {:<6} {:>10}  {}\n",
        "CASE", "EXPECTED", "GOT", "TIME", "RESULT"
    );
    for o in outcomes {
        let expected = o
            .case
            .expect
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join("/");
        let got = o
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into());
        let result = if o.passed() {
            "pass".to_owned()
        } else {
            "FAIL".to_owned()
        };
        let note = match (&o.error, o.passed()) {
            (Some(e), false) => format!(" ({e})"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:<28} {:<9} {:<6} {:>7.1} ms  {result}{note}\n",
            o.case.name,
            expected,
            got,
            o.elapsed.as_secs_f64() * 1000.0
        ));
    }
    let passed = outcomes.iter().filter(|o| o.passed()).count();
    out.push_str(&format!(
        "{passed} passed, {} failed\n",
        outcomes.len() - passed
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            ingest_url("http://localhost:8000").unwrap(),
            "http://localhost:8000/webhook/activity"
        );
        assert_eq!(
            ingest_url("https://x.example.com/webhook/activity").unwrap(),
            "https://x.example.com/webhook/activity"
        );
        assert!(ingest_url("ftp://x").is_err());
        assert!(ingest_url("not a url").is_err());
    }

    #[test]
    fn all_cases_or_one_type() {
        assert_eq!(cases(None, None).len(), 12);
        let one = cases(Some("bK8bg5tajNkDpDk25"), Some(ActivityType::Message));
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].body["order_id"], "bK8bg5tajNkDpDk25");
        assert!(one[0].body["message_id"].is_string());
    }
}
