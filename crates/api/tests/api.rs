//! The API against real VMs: pause/resume, counters, every error class,
//! hostile requests, the socket's life cycle, and openapi.yaml.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use brisk_api::client::{request, Response};
use brisk_api::{ApiServer, SocketError};
use brisk_vmm::{require_kvm, Output, Vm, VmConfig};
use serde_json::Value;

struct Served {
    vm: Arc<Vm>,
    server: Option<ApiServer>,
    path: PathBuf,
}

impl Served {
    fn start(guest: &str, name: &str) -> Served {
        let config = VmConfig {
            payload: brisk_vmm::Payload::builtin(guest),
            cpus: 2,
            ..VmConfig::default()
        };
        let vm = Arc::new(Vm::start(&config, Output::Null).unwrap());
        let path = socket_path(name);
        let server = ApiServer::start(&path, vm.clone()).unwrap();
        Served {
            vm,
            server: Some(server),
            path,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        request(&self.path, method, &format!("/api/v1/{path}"), body, None).unwrap()
    }

    /// `vm.counters` in the Prometheus text format.
    fn prometheus(&self) -> Response {
        let r = request(
            &self.path,
            "GET",
            "/api/v1/vm.counters",
            None,
            Some("text/plain"),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        r
    }

    fn json(&self, path: &str) -> Value {
        let r = self.call("GET", path, None);
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }

    /// Bounded wait for vCPU `id` to progress past `than`; kicks through the
    /// API while waiting (a halted guest only moves when woken).
    fn wait_progress(&self, id: usize, than: u64) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.vm.progress(id) <= than {
            assert!(
                Instant::now() < end,
                "vCPU {id} did not progress past {than}"
            );
            if self.vm.guest() == "halt" {
                let r = self.call("PUT", "vcpu.kick", Some(&format!("{{\"id\":{id}}}")));
                assert_eq!(r.status, 204);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        drop(self.server.take());
        assert!(!self.path.exists(), "the socket outlived its server");
    }
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("brisk-api-{}-{name}.sock", std::process::id()))
}

#[test]
fn pause_and_resume_200_times_freeze_and_release_the_guest() {
    require_kvm!();
    for guest in ["spin", "halt"] {
        let s = Served::start(guest, &format!("pause-{guest}"));
        for id in 0..2 {
            s.wait_progress(id, 0);
        }
        for _ in 0..200 {
            assert_eq!(s.call("PUT", "vm.pause", None).status, 204);
            let frozen = [s.vm.progress(0), s.vm.progress(1)];
            let info = s.json("vm.info");
            assert_eq!(info["state"], "paused");
            for v in info["vcpus"].as_array().unwrap() {
                assert_eq!(v["state"], "parked", "{guest}: {v}");
            }
            assert_eq!(
                [s.vm.progress(0), s.vm.progress(1)],
                frozen,
                "{guest}: progress while paused"
            );
            assert_eq!(s.call("PUT", "vm.resume", None).status, 204);
            for (id, p) in frozen.iter().enumerate() {
                s.wait_progress(id, *p);
            }
        }
        assert_eq!(s.json("vm.info")["state"], "running");
        if guest == "halt" {
            // Left alone, both vCPUs settle halted in user space.
            let end = Instant::now() + Duration::from_secs(10);
            while s.json("vm.info")["vcpus"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["state"] != "halted")
            {
                assert!(Instant::now() < end, "{}", s.json("vm.info"));
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

#[test]
fn counters_match_what_was_done() {
    require_kvm!();
    let s = Served::start("spin", "counters");
    s.wait_progress(0, 0);
    let before = s.json("vm.counters");
    for _ in 0..50 {
        assert_eq!(s.call("PUT", "vcpu.kick", Some("{\"id\": 0}")).status, 204);
    }
    let after = s.json("vm.counters");
    let kicks = |c: &Value, id: usize| c["vcpus"][id]["kicks"].as_u64().unwrap();
    assert_eq!(kicks(&after, 0) - kicks(&before, 0), 50);
    assert_eq!(kicks(&after, 1), kicks(&before, 1), "vCPU 1 was not kicked");
    for _ in 0..5 {
        assert_eq!(s.call("PUT", "vm.pause", None).status, 204);
        assert_eq!(s.call("PUT", "vm.resume", None).status, 204);
    }
    // A park's time is counted when the vCPU leaves it: wait until both
    // have (a resume returns before the parked thread has woken).
    let end = Instant::now() + Duration::from_secs(30);
    while s.json("vm.info")["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["state"] == "parked")
    {
        assert!(Instant::now() < end, "{}", s.json("vm.info"));
        std::thread::sleep(Duration::from_millis(1));
    }
    let c = s.json("vm.counters");
    for v in c["vcpus"].as_array().unwrap() {
        let n = |k: &str| v[k].as_u64().unwrap();
        assert_eq!(n("signals_sent") + n("signals_elided"), n("kicks"), "{v}");
        assert!(n("parked_ns") > 0, "{v}");
    }
    // The Prometheus rendering carries the same numbers.
    let text = s.prometheus();
    assert!(text.body.contains("# TYPE brisk_vcpu_kicks_total counter"));
    let sample = format!("brisk_vcpu_kicks_total{{vcpu=\"1\"}} {}", kicks(&c, 1));
    assert!(
        text.body.lines().any(|l| l == sample),
        "{sample} in\n{}",
        text.body
    );
}

#[test]
fn interrupt_counters_show_what_the_guest_took() {
    require_kvm!();
    let s = Served::start("tick", "irq");
    assert_eq!(
        s.vm.wait(Some(Duration::from_secs(30)), None),
        brisk_vmm::VmEnd::PowerOff
    );
    let c = s.json("vm.counters");
    for id in 0..2 {
        let irq = &c["vcpus"][id]["interrupts"];
        // Every injected tick reached the guest's handler.
        assert_eq!(irq["injected"].as_u64(), Some(s.vm.progress(id)), "{irq}");
        assert!(irq["latency_ns"].as_u64().unwrap() > 0, "{irq}");
    }
    let text = s.prometheus();
    let sample = format!(
        "brisk_vcpu_interrupts_injected_total{{vcpu=\"1\"}} {}",
        s.vm.progress(1)
    );
    assert!(
        text.body.lines().any(|l| l == sample),
        "{sample} in\n{}",
        text.body
    );
    assert_eq!(s.json("vm.info")["mwait"], "hide");
}

#[test]
fn every_error_class_is_answered_with_its_code() {
    require_kvm!();
    let s = Served::start("spin", "errors");
    let cases: [(&str, &str, Option<&str>, u16); 11] = [
        ("GET", "no.such", None, 404),
        ("GET", "vm.pause", None, 405),
        ("PUT", "vm.info", None, 405),
        ("PUT", "vcpu.kick", Some("{\"id\":"), 400),
        ("PUT", "vcpu.kick", Some("[0]"), 400),
        ("PUT", "vcpu.kick", Some("{}"), 400),
        ("PUT", "vcpu.kick", Some("{\"id\": 0, \"now\": true}"), 400),
        ("PUT", "vcpu.kick", Some("{\"id\": 2}"), 400),
        ("PUT", "vcpu.kick", Some("{\"id\": \"zero\"}"), 400),
        ("PUT", "vm.resume", None, 409),
        ("PUT", "vcpu.kick", Some(&*"x".repeat(70 * 1024)), 413),
    ];
    for (method, path, body, status) in cases {
        let r = s.call(method, path, body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{}",
            r.body
        );
    }
    assert_eq!(s.call("PUT", "vm.pause", None).status, 204);
    assert_eq!(s.call("PUT", "vm.pause", None).status, 409);
    assert_eq!(s.call("PUT", "vm.resume", None).status, 204);

    // A vCPU that cannot acknowledge: pause fails with 500 naming it, and
    // no vCPU is left half-paused.
    let (release, blocked) = std::sync::mpsc::channel::<()>();
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let ticket =
        s.vm.vcpu(0)
            .run_on_async(move |_| {
                started_tx.send(()).unwrap();
                blocked.recv().unwrap()
            })
            .unwrap();
    started.recv().unwrap(); // vCPU 0's thread is now stuck in the closure
    let r = s.call("PUT", "vm.pause", None);
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(r.body.contains("vCPU 0"), "{}", r.body);
    assert_eq!(s.json("vm.info")["state"], "running");
    assert!(!s.vm.vcpu(1).is_paused());
    release.send(()).unwrap();
    ticket
        .wait(brisk_control::Deadline::after(Duration::from_secs(5)))
        .unwrap();

    assert_eq!(s.call("PUT", "vm.shutdown", None).status, 204);
    assert_eq!(s.call("PUT", "vm.pause", None).status, 409);
    assert_eq!(s.json("vm.info")["state"], "shutdown");
}

fn raw(path: &PathBuf, bytes: &[u8], close_write: bool) -> String {
    let mut c = UnixStream::connect(path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(bytes);
    if close_write {
        let _ = c.shutdown(std::net::Shutdown::Write);
    }
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

#[test]
fn malformed_huge_or_truncated_requests_do_not_affect_the_vm() {
    require_kvm!();
    let s = Served::start("spin", "hostile");
    s.wait_progress(0, 0);
    let huge_head = b"PUT /api/v1/vcpu.kick HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n";
    let mut huge = huge_head.to_vec();
    huge.extend(std::iter::repeat_n(b'{', 100 * 1024));
    for (bytes, close) in [
        (&b"\x00\x01\x02 this is not HTTP\r\n\r\n"[..], true),
        (&huge[..], false),
        (
            &b"PUT /api/v1/vcpu.kick HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"id\""[..],
            true,
        ),
        (&b"GET /api/v1/vm.in"[..], true),
        (&b"GET /api/v1/vm.info HTTP/1.1\r\nX-Long: "[..], true),
    ] {
        let reply = raw(&s.path, bytes, close);
        assert!(!reply.starts_with("HTTP/1.1 2"), "accepted: {reply}");
        let p = s.vm.progress(0);
        assert_eq!(s.json("vmm.ping")["name"], "brisk", "the API still answers");
        s.wait_progress(0, p);
        assert_eq!(s.vm.ended(), None, "the VM is unaffected");
    }
}

#[test]
fn the_socket_is_private_exclusive_and_removed() {
    require_kvm!();
    let s = Served::start("halt", "socket");
    let mode = std::fs::metadata(&s.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    match ApiServer::start(&s.path, s.vm.clone()) {
        Err(SocketError::InUse(_)) => {}
        other => panic!("a live socket must be refused, got {:?}", other.map(|_| ())),
    }
    // A stale socket (nobody listening) is replaced.
    let stale = socket_path("stale");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = ApiServer::start(&stale, s.vm.clone()).unwrap();
    assert_eq!(
        request(&stale, "GET", "/api/v1/vmm.ping", None, None)
            .unwrap()
            .status,
        200
    );
    drop(server);
    assert!(!stale.exists());
    // Served's drop checks its own socket is removed.
}

#[test]
fn every_path_in_openapi_yaml_answers() {
    require_kvm!();
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.yaml"))
        .unwrap();
    // Paths are the two-space-indented keys starting with '/', methods the
    // four-space-indented keys under them.
    let mut documented = Vec::new();
    let mut current = None;
    for line in spec.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            current = Some(p.to_string());
        } else if let (Some(p), Some(m)) = (
            &current,
            line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
        ) {
            if m == "get" || m == "put" {
                documented.push((m.to_uppercase(), p.clone()));
            }
        } else if !line.starts_with("    ") {
            current = None;
        }
    }
    assert_eq!(
        documented.len(),
        brisk_api::Endpoint::ALL.len(),
        "{documented:?}"
    );
    let s = Served::start("spin", "openapi");
    let snap = std::env::temp_dir().join(format!("brisk-openapi-snap-{}", std::process::id()));
    let snapshot = format!("{{\"destination_url\": \"file://{}\"}}", snap.display());
    // Every path is routed and does what it says: most answer 2xx on a
    // running VM; the migration paths answer as they must with no
    // destination (the failed migration is then vm.migration's status),
    // and a brisk that has its VM refuses another.
    let expect = |path: &str| -> (Option<String>, u16) {
        match path {
            "vcpu.kick" => (Some("{\"id\": 0}".into()), 204),
            "vm.snapshot" => (Some(snapshot.clone()), 200),
            "vm.send-migration" => (
                Some("{\"destination_url\": \"unix:/nonexistent/brisk.sock\"}".into()),
                500,
            ),
            "vm.cancel-migration" => (None, 409),
            "vm.restore" => (
                Some(format!("{{\"source_url\": \"file://{}\"}}", snap.display())),
                409,
            ),
            "vm.receive-migration" => {
                (Some("{\"receiver_url\": \"unix:/tmp/x.sock\"}".into()), 409)
            }
            "vm.pause" | "vm.resume" | "vm.shutdown" => (None, 204),
            _ => (None, 200),
        }
    };
    // Shutdown last: it ends the VM; vm.migration after send-migration.
    documented.sort_by_key(|(_, p)| (p == "vm.shutdown", p == "vm.migration"));
    for (method, path) in &documented {
        let (body, status) = expect(path);
        if path == "vm.resume" {
            assert_eq!(s.call("PUT", "vm.pause", None).status, 204);
        }
        let r = s.call(method, path, body.as_deref());
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        if path == "vm.pause" {
            assert_eq!(s.call("PUT", "vm.resume", None).status, 204);
        }
    }
    let saved: brisk_vmm::snapshot::SavedVm =
        brisk_vmm::snapshot::file::read(&snap.join("state")).unwrap();
    assert!(snap.join(&saved.memory_file).exists());
    std::fs::remove_dir_all(&snap).unwrap();
    for e in brisk_api::Endpoint::ALL {
        let (path, method) = (e.path(), e.method());
        let p = path.trim_start_matches("/api/v1/");
        assert!(
            documented.iter().any(|(m, d)| m == method && d == p),
            "{method} {path} undocumented"
        );
    }
}
