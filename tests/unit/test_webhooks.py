"""Webhooks' domain (`shared.webhooks`): Standard Webhooks signatures, the URL and address
checks, the delivery lifecycle (enqueued with the transition, claimed once, retried with a
bounded backoff) and one real POST per outcome to a local receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Sequence
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.prestart import migrate
from shared import webhooks
from shared.config import Settings
from shared.db import session_factory
from shared.errors import Invalid
from shared.jobs.states import JobStatus, set_status
from shared.models import Job, OutboxMessage, Tenant, WebhookDelivery, WebhookEndpoint, utcnow
from tests.conftest import embedded_settings
from tests.webhook_receiver import webhook_receiver

Sessions = sessionmaker[Session]
FUZZ = hypothesis_settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def expected_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """The test's own Standard Webhooks signature, from the spec's words."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# --------------------------------------------------------------------------- signing


def test_signature_matches_the_standard_webhooks_reference_vector() -> None:
    # The reference libraries' own test vector (standard-webhooks, svix).
    assert (
        webhooks.sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
            timestamp=1614265330,
            body=b'{"test": 2432232314}',
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_signed_headers_verify_with_an_independent_hmac() -> None:
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert webhooks.new_secret() != secret
    body = b'{"id":"evt_1","type":"fine_tuning.job.succeeded"}'
    headers = webhooks.signed_headers(secret, msg_id="msg-abc", body=body, timestamp=1700000000)
    assert headers["webhook-id"] == "msg-abc"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"] == expected_signature(secret, "msg-abc", "1700000000", body)
    # Any change to id, timestamp or body changes the signature.
    assert headers["webhook-signature"] != expected_signature(secret, "msg-abd", "1700000000", body)
    assert headers["webhook-signature"] != expected_signature(secret, "msg-abc", "1700000001", body)
    assert headers["webhook-signature"] != expected_signature(
        secret, "msg-abc", "1700000000", body + b" "
    )


def test_the_openai_sdk_verifies_our_signatures() -> None:
    from openai import OpenAI

    secret = webhooks.new_secret()
    body = webhooks.event_body(
        {
            "id": webhooks.new_event_id(),
            "object": "event",
            "created_at": 1700000000,
            "type": "fine_tuning.job.succeeded",
            "data": {"id": "ftjob-abc"},
        }
    )
    headers = webhooks.signed_headers(secret, msg_id="msg-x", body=body, timestamp=int(time.time()))
    client = OpenAI(api_key="unused", webhook_secret=secret)
    event = client.webhooks.unwrap(body.decode(), headers)
    assert event.type == "fine_tuning.job.succeeded" and event.data.id == "ftjob-abc"


# --------------------------------------------------------------------------- addresses and URLs


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("fd00:ec2::254", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.1.2.3", "private"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("8.8.8.8", None),
        ("172.32.0.1", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_kinds(address: str, kind: str | None) -> None:
    assert webhooks.address_kind(address) == kind


def fake_dns(table: dict[str, Sequence[str]]) -> webhooks.Resolver:
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return list(table[host])

    return resolve


DNS = fake_dns(
    {
        "hooks.example.com": ["93.184.216.34"],
        "rebind.example.com": ["127.0.0.1"],
        "metadata.example.com": ["169.254.169.254"],
        "mixed.example.com": ["93.184.216.34", "10.0.0.7"],
        "v6.example.com": ["2606:4700::6810:85e5", "fd00::1"],
        "127.0.0.1": ["127.0.0.1"],
    }
)


def refused(url: str, *, resolve: webhooks.Resolver = DNS, allow: bool = False) -> Invalid:
    with pytest.raises(Invalid) as info:
        webhooks.validate_url(url, allow_private=allow, resolve=resolve)
    assert info.value.param == "url"
    return info.value


def test_public_https_and_http_urls_are_accepted() -> None:
    for url in ("https://hooks.example.com/qlora?x=1", "http://hooks.example.com:8080/"):
        assert webhooks.validate_url(url, allow_private=False, resolve=DNS) == url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.com/",
        "file:///etc/passwd",
        "gopher://hooks.example.com/",
        "ws://hooks.example.com/",
        "javascript:alert(1)",
        "data:text/plain,hi",
        "hooks.example.com/path",
        "//hooks.example.com/path",
    ],
)
def test_only_http_and_https_schemes(url: str) -> None:
    assert refused(url).code == "invalid_url_scheme"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.1/",  # short IPv4 forms resolve to loopback too
        "http://2130706433/",  # 127.0.0.1 as one decimal number
        "http://0x7f000001/",
        "http://[::1]:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0:9000/",
        "http://10.0.0.5/",
        "http://172.16.3.4/",
        "http://192.168.0.10/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fc00::1]/",
        "http://localhost:8000/hook",  # a name that resolves to loopback (/etc/hosts)
    ],
)
def test_non_public_addresses_are_refused(url: str) -> None:
    error = refused(url, resolve=webhooks.resolve_host)
    assert error.code == "private_address"
    assert "127.0.0.1" not in error.message and "::1" not in error.message


def test_hostnames_are_checked_by_every_address_they_resolve_to() -> None:
    assert "loopback" in refused("https://rebind.example.com/").message
    assert "link-local" in refused("https://metadata.example.com/").message
    assert refused("https://mixed.example.com/").code == "private_address"
    assert refused("https://v6.example.com/").code == "private_address"


def test_userinfo_tricks_and_malformed_urls() -> None:
    # The real host of `http://hooks.example.com@127.0.0.1/` is 127.0.0.1: any userinfo is refused.
    for url in (
        "http://hooks.example.com@127.0.0.1/",
        "http://user:pass@hooks.example.com/",
        "http://hooks.example.com:80@rebind.example.com/",
    ):
        assert refused(url).code == "invalid_url"
    assert refused("http://hooks.example.com/#frag").code == "invalid_url"
    assert refused("http://hooks.example.com/a b").code == "invalid_url"
    assert refused("http://bücher.example/").code == "invalid_url"
    assert refused("http://hooks.example.com:99999/").code == "invalid_url"
    assert refused("http:///path").code == "invalid_url"
    assert refused("https://nowhere.example.com/").code == "unresolvable_host"
    long = "https://hooks.example.com/" + "a" * webhooks.MAX_URL_CHARS
    assert refused(long).code == "url_too_long"


def test_the_admin_setting_allows_private_addresses() -> None:
    url = "http://127.0.0.1:9000/hook"
    assert webhooks.validate_url(url, allow_private=True, resolve=DNS) == url
    assert refused(url, allow=False).code == "private_address"
    # The scheme and userinfo rules hold either way.
    assert refused("ftp://127.0.0.1/", allow=True).code == "invalid_url_scheme"
    assert refused("http://a@127.0.0.1/", allow=True).code == "invalid_url"


# --------------------------------------------------------------------------- lifecycle


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return embedded_settings(
        tmp_path / "var",
        webhooks_allow_private=True,
        webhooks_retry_base_seconds=10,
        webhooks_retry_max_interval_seconds=60,
        webhooks_max_attempts=4,
        webhooks_timeout_seconds=2,
    )


@pytest.fixture
def sessions(settings: Settings) -> Sessions:
    migrate(settings)
    return session_factory(settings)


def add_tenant_and_job(sessions: Sessions, tenant: str, job_id: str) -> None:
    with sessions.begin() as session:
        if session.get(Tenant, tenant) is None:
            session.add(Tenant(id=tenant, name=tenant))
            session.flush()
        session.add(
            Job(
                id=job_id,
                tenant_id=tenant,
                model="m",
                training_file="file-x",
                status="queued",
                spec={},
                hyperparameters={},
                seed=0,
                gpu_class="cpu",
            )
        )


def add_endpoint(
    sessions: Sessions, settings: Settings, tenant: str, url: str, events: list[str] | None = None
) -> WebhookEndpoint:
    with sessions.begin() as session:
        return webhooks.create_endpoint(
            session, tenant_id=tenant, url=url, events=events, description=None, settings=settings
        )


def move(sessions: Sessions, job_id: str, target: JobStatus) -> None:
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert set_status(session, job, target, message=f"-> {target.value}")


def deliveries(sessions: Sessions) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))


def webhook_rows(sessions: Sessions) -> list[OutboxMessage]:
    with sessions() as session:
        return list(session.scalars(select(OutboxMessage).where(OutboxMessage.queue == "webhooks")))


def test_deliveries_are_written_with_the_transition_and_only_for_subscribers(
    sessions: Sessions, settings: Settings
) -> None:
    add_tenant_and_job(sessions, "org-a", "ftjob-a")
    add_tenant_and_job(sessions, "org-b", "ftjob-b")
    everything = add_endpoint(sessions, settings, "org-a", "http://127.0.0.1:1/all")
    outcomes = add_endpoint(
        sessions, settings, "org-a", "http://127.0.0.1:1/ends", ["fine_tuning.job.succeeded"]
    )
    add_endpoint(sessions, settings, "org-b", "http://127.0.0.1:1/other")

    # A transition rolled back leaves no delivery and no message behind.
    with pytest.raises(RuntimeError), sessions.begin() as session:
        job = session.get(Job, "ftjob-a")
        assert job is not None and set_status(session, job, JobStatus.RUNNING, message="x")
        assert len(session.scalars(select(WebhookDelivery)).all()) == 1
        raise RuntimeError("the transaction fails after the transition")
    assert deliveries(sessions) == [] and webhook_rows(sessions) == []

    move(sessions, "ftjob-a", JobStatus.RUNNING)
    move(sessions, "ftjob-a", JobStatus.RUNNING)  # a re-claim is no news
    move(sessions, "ftjob-a", JobStatus.SUCCEEDED)
    rows = deliveries(sessions)
    assert sorted((d.endpoint_id, d.event_type) for d in rows) == sorted(
        [
            (everything.id, "fine_tuning.job.running"),
            (everything.id, "fine_tuning.job.succeeded"),
            (outcomes.id, "fine_tuning.job.succeeded"),
        ]
    )
    assert all(d.tenant_id == "org-a" and d.status == "pending" for d in rows)
    succeeded = [d for d in rows if d.event_type.endswith("succeeded")]
    # One event, one id, the same payload for every endpoint; each delivery its own message id.
    assert succeeded[0].payload == succeeded[1].payload
    payload = succeeded[0].payload
    assert set(payload) == {"id", "object", "created_at", "type", "data"}
    assert payload["object"] == "event" and payload["id"].startswith("evt_")
    assert payload["data"] == {"id": "ftjob-a"} and payload["type"] == "fine_tuning.job.succeeded"
    assert {r.job_id for r in webhook_rows(sessions)} == {d.id for d in rows}
    # Queued is not an event type.
    add_tenant_and_job(sessions, "org-a", "ftjob-c")
    move(sessions, "ftjob-c", JobStatus.CANCELLED)
    assert deliveries(sessions)[-1].event_type == "fine_tuning.job.cancelled"


def test_a_delivery_is_claimed_once_retried_with_backoff_then_failed(
    sessions: Sessions, settings: Settings
) -> None:
    add_tenant_and_job(sessions, "org-a", "ftjob-a")
    add_endpoint(sessions, settings, "org-a", "http://127.0.0.1:1/")
    move(sessions, "ftjob-a", JobStatus.RUNNING)
    [delivery] = deliveries(sessions)
    now = utcnow()
    with sessions.begin() as session:
        first = webhooks.claim(session, delivery.id, settings=settings, now=now)
    assert first is not None and first.attempt == 1
    assert json.loads(first.body) == delivery.payload
    with sessions.begin() as session:  # a duplicate message: the live attempt holds it
        assert webhooks.claim(session, delivery.id, settings=settings, now=now) is None
    failure = webhooks.AttemptResult(False, 500, "HTTP 500")
    with sessions.begin() as session:
        assert webhooks.record(session, delivery.id, failure, settings=settings, now=now) == (
            "pending"
        )
    [row] = deliveries(sessions)
    assert row.attempts == 1 and row.last_status_code == 500 and row.last_error == "HTTP 500"
    assert row.next_attempt_at is not None
    assert abs((row.next_attempt_at.replace(tzinfo=UTC) - now).total_seconds() - 10) < 1
    # Backoff: 10, 20, 40, then the cap of 60 s.
    assert [webhooks.retry_delay(n, settings) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    t = now
    for attempt in (2, 3, 4):
        t += timedelta(seconds=webhooks.retry_delay(attempt - 1, settings))
        with sessions.begin() as session:
            early = webhooks.claim(
                session, delivery.id, settings=settings, now=t - timedelta(seconds=1)
            )
            assert early is None
        with sessions.begin() as session:
            claimed = webhooks.claim(session, delivery.id, settings=settings, now=t)
        assert claimed is not None and claimed.attempt == attempt
        with sessions.begin() as session:
            status = webhooks.record(session, delivery.id, failure, settings=settings, now=t)
        assert status == ("failed" if attempt == 4 else "pending")
    [row] = deliveries(sessions)
    assert (row.status, row.attempts, row.next_attempt_at) == ("failed", 4, None)
    with sessions.begin() as session:  # later messages find nothing to do
        assert webhooks.claim(session, delivery.id, settings=settings, now=t + timedelta(1)) is None


def test_an_attempt_that_died_is_retried_and_the_budget_still_ends_it(
    sessions: Sessions, settings: Settings
) -> None:
    add_tenant_and_job(sessions, "org-a", "ftjob-a")
    add_endpoint(sessions, settings, "org-a", "http://127.0.0.1:1/")
    move(sessions, "ftjob-a", JobStatus.RUNNING)
    [delivery] = deliveries(sessions)
    t = utcnow()
    for _ in range(settings.webhooks_max_attempts):  # every attempt dies before recording
        with sessions.begin() as session:
            assert webhooks.claim(session, delivery.id, settings=settings, now=t) is not None
        t += timedelta(seconds=settings.webhooks_timeout_seconds + 3)
    with sessions.begin() as session:
        assert webhooks.claim(session, delivery.id, settings=settings, now=t) is None
    [row] = deliveries(sessions)
    assert row.status == "failed" and row.attempts == settings.webhooks_max_attempts
    # Each claim left a recovery message for the time its hold ends.
    assert len(webhook_rows(sessions)) == 1 + settings.webhooks_max_attempts


def test_a_deleted_endpoint_takes_its_deliveries_along(
    sessions: Sessions, settings: Settings
) -> None:
    add_tenant_and_job(sessions, "org-a", "ftjob-a")
    endpoint = add_endpoint(sessions, settings, "org-a", "http://127.0.0.1:1/")
    move(sessions, "ftjob-a", JobStatus.RUNNING)
    with sessions.begin() as session:
        webhooks.delete_endpoint(session, tenant_id="org-a", endpoint_id=endpoint.id)
    assert deliveries(sessions) == []
    [message] = webhook_rows(sessions)
    with sessions.begin() as session:
        assert webhooks.claim(session, message.job_id, settings=settings) is None


# --------------------------------------------------------------------------- one real POST


def test_send_signs_posts_and_reports_each_outcome() -> None:
    secret = webhooks.new_secret()
    body = b'{"hello":"world"}'
    with webhook_receiver() as receiver:

        def post(path: str, *, allow: bool = True, timeout: float = 2.0) -> webhooks.AttemptResult:
            return webhooks.send(
                receiver.url + path,
                secret=secret,
                msg_id="msg-1",
                body=body,
                timeout=timeout,
                allow_private=allow,
            )

        assert post("/ok?x=1") == webhooks.AttemptResult(True, 200, None)
        [got] = receiver.on("/ok?x=1")
        assert got.body == body and got.headers["content-type"] == "application/json"
        assert got.headers["host"] == receiver.url.removeprefix("http://")
        assert got.headers["webhook-signature"] == expected_signature(
            secret, "msg-1", got.headers["webhook-timestamp"], body
        )
        receiver.script("/fail", 500)
        assert post("/fail") == webhooks.AttemptResult(False, 500, "HTTP 500")
        receiver.script("/moved", 302)
        receiver.redirect_to = receiver.url + "/target"
        result = post("/moved")
        assert result.status_code == 302 and "redirects are not followed" in (result.error or "")
        assert receiver.on("/target") == []
        # The setting off: a loopback receiver is never contacted.
        before = len(receiver.requests)
        assert post("/ok", allow=False) == webhooks.AttemptResult(
            False, None, "the host resolves to a loopback address"
        )
        assert len(receiver.requests) == before
        receiver.delay = 1.0
        assert post("/slow", timeout=0.3) == webhooks.AttemptResult(
            False, None, "no answer within 0.3 s"
        )
        receiver.delay = 0
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused_result = webhooks.send(
        f"http://127.0.0.1:{port}/",
        secret=secret,
        msg_id="m",
        body=body,
        timeout=1,
        allow_private=True,
    )
    assert refused_result == webhooks.AttemptResult(False, None, "the connection was refused")


URLISH = st.builds(
    lambda scheme, host, port, path: f"{scheme}{host}{port}{path}",
    st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "", "http:", "https:///"]),
    st.text(max_size=30)
    | st.sampled_from(["hooks.example.com", "[::1]", "[fe80::1%25eth0]", "a@b", "[", "]", "::"]),
    st.sampled_from(["", ":", ":0", ":80", ":65536", ":-1", ":x", ":443:1"]),
    st.text(max_size=20),
)


@FUZZ
@given(url=URLISH | st.text(max_size=60))
def test_any_string_is_a_valid_url_or_a_400_naming_url(url: str) -> None:
    def resolve(host: str, port: int) -> list[str]:
        if host == "hooks.example.com":
            return ["93.184.216.34"]
        return webhooks.resolve_host(host, port) if _is_ip(host) else fake_dns({})(host, port)

    try:
        assert webhooks.validate_url(url, allow_private=False, resolve=resolve) == url
    except Invalid as exc:
        assert exc.param == "url" and exc.code and exc.status_code == 400


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for `localhost` only (no IP in it), and its key."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_goes_to_the_checked_address_and_verifies_the_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    body = b"{}"
    with webhook_receiver() as receiver:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        receiver.wrap_tls(tls)
        port = receiver.url.rsplit(":", 1)[1]

        def post(url: str) -> webhooks.AttemptResult:
            return webhooks.send(
                url,
                secret=webhooks.new_secret(),
                msg_id="m",
                body=body,
                timeout=2,
                allow_private=True,
                resolve=fake_dns({"localhost": ["127.0.0.1"], "127.0.0.1": ["127.0.0.1"]}),
            )

        # Not trusted yet: the certificate is checked.
        assert post(f"https://localhost:{port}/a").error == (
            "the TLS handshake failed (certificate or protocol)"
        )
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        # Connected to 127.0.0.1 (the resolved address), verified as `localhost` (the URL's name).
        assert post(f"https://localhost:{port}/b") == webhooks.AttemptResult(True, 200, None)
        [got] = receiver.on("/b")
        assert got.headers["host"] == f"localhost:{port}"
        # The same server under a name its certificate does not carry is refused.
        assert post(f"https://127.0.0.1:{port}/c").error == (
            "the TLS handshake failed (certificate or protocol)"
        )
        assert receiver.on("/c") == []
