//! Listing tasks: filters, sorts, cursor and offset paging.

mod common;

use common::*;
use serde_json::json;

/// Every page of a listing, following `nextCursor` from `url` (which has a query already);
/// each page must answer 200 with whole tasks (their instructions too, which the store keeps
/// apart from the rows it filters and orders), and `check` sees each answer.
async fn walk_pages(app: &TestApp, url: &str, check: impl Fn(&Resp)) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = app.get(&format!("{url}{cursor}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        for t in r.data().as_array().unwrap() {
            let text = t["instructions"].as_str().unwrap_or_default();
            assert!(!text.is_empty(), "a listed task without its body: {t}");
        }
        check(&r);
        seen.extend(ids(r.data()));
        match r.body["pagination"]["nextCursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return seen,
        }
    }
}

/// Queued tasks by priority come from the ready index merged with the delayed tasks; the
/// page must be the one the general path gives (asked here with a second status that no
/// task has, which takes the general path).
#[tokio::test]
async fn queued_by_priority_pages_like_the_general_listing() {
    let app = spawn_with_manual_clock().await;
    let p = app.project("p").await;
    let other = app.project("other").await;
    let now = app
        .clock
        .as_ref()
        .map(|c| agentq::time::Clock::now(c.as_ref()))
        .unwrap();
    let types = [
        app.task_type(&p, json!({"name": "one"})).await,
        app.task_type(&p, json!({"name": "two"})).await,
    ];
    for i in 0..60u32 {
        let mut body = json!({"instructions": format!("t{i}"), "priority": (i * 7) % 11});
        if i % 3 < 2 {
            body["typeId"] = json!(types[i as usize % 3]);
        }
        if i % 7 == 4 {
            // Queued, but not in the ready index until its time.
            body["notBefore"] = json!(agentq::time::format(now + 60_000 + i64::from(i)));
        }
        app.task(&p, body).await;
    }
    // Tasks that are not queued, and another project's delayed task, stay out.
    for agent in ["a", "b", "c"] {
        app.next(agent, json!({"projectId": p})).await;
    }
    let later = agentq::time::format(now + 60_000);
    app.task(
        &other,
        json!({"instructions": "x", "notBefore": later, "priority": 10}),
    )
    .await;
    let untyped = format!("/api/projects/{p}/tasks?sort=priority");
    let typed = format!("{untyped}&typeId={}", types[1]);
    for (path, order, n) in [
        (&untyped, "asc", 57),
        (&untyped, "desc", 57),
        // 20 of type two, less any the three agents hold.
        (&typed, "asc", 20),
        (&typed, "desc", 20),
    ] {
        let general = app
            .get(&format!(
                "{path}&order={order}&status=queued,cancelled&limit=100"
            ))
            .await;
        let all = ids(general.data());
        assert!(all.len() <= n && all.len() + 3 >= n, "{}", all.len());
        if path == &untyped {
            assert_eq!(all.len(), 57, "three of the 60 are held");
        }
        assert_eq!(general.body["pagination"]["total"], all.len());
        for (limit, offset) in [
            (100, 0),
            (10, 0),
            (10, 5),
            (7, 50),
            (3, 56),
            (5, 57),
            (5, 90),
        ] {
            let q = format!("&order={order}&limit={limit}&offset={offset}");
            let fast = app.get(&format!("{path}&status=queued{q}")).await;
            let slow = app.get(&format!("{path}&status=queued,cancelled{q}")).await;
            assert_eq!(fast.status, 200, "{:?}", fast.body);
            assert_eq!(ids(fast.data()), ids(slow.data()), "{order} {q}");
            assert_eq!(
                fast.body["pagination"], slow.body["pagination"],
                "{order} {q}"
            );
        }
        // Walking by cursor gives every queued task once, in the general order.
        let url = format!("{path}&status=queued&order={order}&limit=8");
        assert_eq!(walk_pages(&app, &url, |_| {}).await, all, "{order}");
    }
    // In creation order too, the total of one type's queued tasks (counted from the index)
    // is the general path's.
    for ty in &types {
        let path = format!("/api/projects/{p}/tasks?typeId={ty}&limit=5");
        let fast = app.get(&format!("{path}&status=queued")).await;
        let slow = app.get(&format!("{path}&status=queued,cancelled")).await;
        assert_eq!(ids(fast.data()), ids(slow.data()));
        assert_eq!(fast.body["pagination"], slow.body["pagination"]);
        assert!(fast.body["pagination"]["total"].as_u64() > Some(15));
    }
    // The order itself: priorities never rise going down a descending page.
    let r = app
        .get(&format!("{untyped}&status=queued&order=desc&limit=100"))
        .await;
    let prios: Vec<u64> = r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["priority"].as_u64().unwrap())
        .collect();
    assert!(prios.windows(2).all(|w| w[0] >= w[1]), "{prios:?}");
}

#[tokio::test]
async fn listing_filters_sorts_and_pages() {
    let app = spawn_app().await;
    let p = app.project("p").await;
    let mut created = Vec::new();
    for i in 0..25 {
        created.push(
            app.task(
                &p,
                json!({"instructions": format!("t{i}"), "priority": i % 3}),
            )
            .await,
        );
    }
    let path = format!("/api/projects/{p}/tasks");
    // Default: newest first.
    let r = app.get(&format!("{path}?limit=10")).await;
    assert_eq!(r.body["pagination"]["total"], 25);
    assert_eq!(ids(r.data())[0], created[24]);
    // Cursor paging walks everything exactly once, oldest first.
    let seen = walk_pages(&app, &format!("{path}?order=asc&limit=7"), |_| {}).await;
    assert_eq!(seen, created);
    // A cursor the document's pattern allows but beyond every real key is the range's end;
    // paging past either end of the key space (or far past the last offset) is empty.
    let huge_offset = "cursor=o999999999999999999&offset=9223372036854775807";
    for (query, expected) in [
        ("order=asc&cursor=k-9999999999999999999.0", 25),
        ("order=asc&cursor=k0006064.95561927770212144555", 25),
        (
            "order=asc&cursor=k9999999999999999999.99999999999999999999",
            0,
        ),
        (
            "order=asc&cursor=k9223372036854775807.18446744073709551615",
            0,
        ),
        ("order=desc&cursor=k-9223372036854775808.0", 0),
        ("order=desc&cursor=k-9999999999999999999.5", 0),
        ("order=desc&cursor=k9999999999999999999.0", 25),
        ("order=asc&cursor=o0", 25),
        ("order=asc&cursor=o999999999999999999", 0),
        (&format!("sort=createdAt&{huge_offset}"), 0),
        (&format!("sort=priority&{huge_offset}"), 0),
    ] {
        let r = app.get(&format!("{path}?{query}")).await;
        assert_eq!(r.status, 200, "{query}: {:?}", r.body);
        assert_eq!(r.data().as_array().unwrap().len(), expected, "{query}");
    }
    let r = app.get(&format!("{path}?cursor=k12")).await;
    assert_eq!(r.status, 400);
    // Offset paging.
    let r = app
        .get(&format!("{path}?order=asc&limit=5&offset=20"))
        .await;
    assert_eq!(ids(r.data()), created[20..].to_vec());
    // Status filters use the counters for totals.
    let claimed = app.next("a", json!({"projectId": p})).await;
    let r = app.get(&format!("{path}?status=running")).await;
    assert_eq!(r.body["pagination"]["total"], 1);
    assert_eq!(r.data()[0]["id"], claimed["id"]);
    let r = app.get(&format!("{path}?status=queued,running")).await;
    assert_eq!(r.body["pagination"]["total"], 25);
    // Only a running task is assigned, whatever the statuses asked for.
    for (query, total) in [
        ("assignedTo=b", 0),
        ("assignedTo=a&status=queued", 0),
        ("assignedTo=a&status=queued,running", 1),
        ("assignedTo=a&sort=priority", 1),
    ] {
        let r = app.get(&format!("{path}?{query}")).await;
        assert_eq!(r.body["pagination"]["total"], total, "{query}");
        assert_eq!(r.data().as_array().unwrap().len(), total, "{query}");
    }
    let r = app.get(&format!("{path}?assignedTo=a")).await;
    assert_eq!(r.body["pagination"]["total"], 1);
    assert_eq!(r.data()[0]["id"], claimed["id"]);
    // List items leave out attempts and outputs.
    assert!(r.data()[0].get("attempts").is_none());
    // Priority order, walked page by page with the cursor, is (priority, age) either way.
    for order in ["asc", "desc"] {
        let mut expected: Vec<usize> = (0..25).collect();
        expected.sort_by_key(|&i| (i % 3, i));
        if order == "desc" {
            expected.reverse();
        }
        let expected: Vec<String> = expected.into_iter().map(|i| created[i].clone()).collect();
        let url = format!("{path}?sort=priority&order={order}&limit=7");
        let seen = walk_pages(&app, &url, |r| {
            assert_eq!(r.body["pagination"]["total"], 25);
        })
        .await;
        assert_eq!(seen, expected, "{order}");
        let r = app
            .get(&format!(
                "{path}?sort=priority&order={order}&limit=4&offset=10"
            ))
            .await;
        assert_eq!(ids(r.data()), expected[10..14].to_vec(), "{order}");
        let r = app
            .get(&format!("{path}?sort=updatedAt&order={order}&offset=23"))
            .await;
        // The claimed task was updated last; the others tie or follow creation.
        let by_update: Vec<String> = if order == "asc" {
            vec![
                created[24].clone(),
                claimed["id"].as_str().unwrap().to_string(),
            ]
        } else {
            vec![created[1].clone(), created[0].clone()]
        };
        assert_eq!(ids(r.data()), by_update, "{order}");
    }
    // Priority sort.
    let r = app
        .get(&format!("{path}?sort=priority&order=desc&limit=3"))
        .await;
    assert!(r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["priority"] == 2));
    // Time range.
    let first_created = app.get(&format!("/api/tasks/{}", created[0])).await.data()["createdAt"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .get(&format!("{path}?createdBefore={first_created}"))
        .await;
    assert_eq!(r.body["pagination"]["total"], 0);
    let r = app.get(&format!("{path}?sort=name")).await;
    assert_eq!(r.status, 400);
}
