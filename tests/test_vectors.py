"""schemas/vectors/: what a maker checks an agent against, checked here with our code and with
implementations that are not ours: OpenSSL for Ed25519 and SHA-256, the `jcs` package (the
RFC 8785 author's Python port) for the canonical bytes. A bug of ours in signing or
canonicalization cannot move the vectors with it."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import jcs
import pytest

from homenet.schemas import ContractError, canonical, decode, signed_by
from homenet.schemas.signing import pairing_code, unb64
from homenet.schemas.testvectors import VECTOR_DIR, VERDICTS, generate, verdict

from .conftest import require_program

REGENERATE = "run `make schemas` and commit schemas/vectors/"
KEYS = json.loads((VECTOR_DIR / "keys.json").read_text(encoding="utf-8"))
VALID = json.loads((VECTOR_DIR / "valid.json").read_text(encoding="utf-8"))
INVALID = json.loads((VECTOR_DIR / "invalid.json").read_text(encoding="utf-8"))
PAIRING = json.loads((VECTOR_DIR / "pairing.json").read_text(encoding="utf-8"))
ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")
"""The DER header of an Ed25519 SubjectPublicKeyInfo (RFC 8410): then the raw 32 bytes."""


def public(signer: str) -> bytes:
    return base64.b64decode(KEYS[signer]["public_key"], validate=True)


def openssl_verifies(tmp_path: Path, signer: str, data: bytes, sig: bytes) -> bool:
    openssl = require_program("openssl")
    pem = tmp_path / "public.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(ED25519_SPKI + public(signer)).decode()
                   + "\n-----END PUBLIC KEY-----\n")
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "sig").write_bytes(sig)
    done = subprocess.run([openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(pem), "-rawin",
                           "-in", str(tmp_path / "data"), "-sigfile", str(tmp_path / "sig")],
                          capture_output=True, text=True, timeout=20)
    assert "Signature Verified Successfully" in done.stdout or "Signature Verification Failure" in done.stdout, \
        done.stderr
    return done.returncode == 0


def unsigned(payload: str) -> dict:
    return {k: v for k, v in json.loads(payload).items() if k != "sig"}


@pytest.mark.parametrize("name", sorted(generate()))
def test_committed_vectors_are_what_the_fixed_keys_give(name: str) -> None:
    path = VECTOR_DIR / name
    assert path.exists() and path.read_text(encoding="utf-8") == generate()[name], f"{name} drifted: {REGENERATE}"


def test_there_is_a_valid_vector_of_every_kind() -> None:
    from homenet.schemas.messages import BODIES
    assert sorted(c["name"] for c in VALID) == sorted(BODIES)


@pytest.mark.parametrize("case", VALID, ids=[c["name"] for c in VALID])
def test_a_valid_vector_is_canonical_and_signed_by_every_implementation(case: dict, tmp_path: Path) -> None:
    data = case["canonical"].encode("utf-8")
    assert data.hex() == case["canonical_hex"]
    assert canonical(unsigned(case["payload"])) == data, "ours"
    assert jcs.canonicalize(unsigned(case["payload"])) == data, "the independent RFC 8785 implementation"
    sig = base64.b64decode(case["sig"], validate=True)
    assert len(sig) == 64 and openssl_verifies(tmp_path, case["signer"], data, sig)
    envelope, _ = decode(case["payload"].encode())
    assert signed_by(envelope, public(case["signer"]))
    assert verdict(case["payload"].encode(), public(case["signer"])) == "valid"


@pytest.mark.parametrize("case", INVALID, ids=[c["name"] for c in INVALID])
def test_an_invalid_vector_gets_its_verdict_and_our_receivers_refuse_it(case: dict, tmp_path: Path) -> None:
    assert case["verdict"] in VERDICTS and case["verdict"] != "valid"
    payload, key = case["payload"].encode(), public(case["signer"])
    assert verdict(payload, key, case["last_seq"]) == case["verdict"], case["why"]
    try:
        envelope, _ = decode(payload)
    except ContractError:
        return
    refused = not signed_by(envelope, key) or envelope.seq <= case["last_seq"]
    if envelope.kind == "register":  # the configurator reads the key the register carries
        refused = refused or len(unb64(envelope.body["public_key"]) or b"") != 32
    assert refused
    if case["verdict"] == "bad_signature":  # not only by our verifier
        sig = unb64(envelope.sig or "")
        assert sig is not None and not openssl_verifies(tmp_path, case["signer"], jcs.canonicalize(
            unsigned(case["payload"])), sig)


def test_the_pairing_code_vector_byte_by_byte(tmp_path: Path) -> None:
    key = base64.b64decode(PAIRING["public_key"], validate=True)
    data = bytes.fromhex(PAIRING["input_hex"])
    assert data == b"homenet-pairing:" + key and key.hex() == PAIRING["public_key_hex"]
    (tmp_path / "input").write_bytes(data)
    digest = subprocess.run([require_program("openssl"), "dgst", "-sha256", "-r", str(tmp_path / "input")],
                            capture_output=True, text=True, check=True, timeout=20).stdout.split()[0]
    assert digest == PAIRING["sha256_hex"]
    number = int.from_bytes(bytes.fromhex(digest)[:8], "big")
    assert str(number) == PAIRING["first_8_bytes_big_endian"] and number % 1_000_000 == PAIRING["modulo_1000000"]
    assert PAIRING["code"] == f"{number % 1_000_000 // 1000:03d}-{number % 1000:03d}" == pairing_code(key)


JS_CANONICALIZE = """
// RFC 8785 in JavaScript, as its appendix describes: JSON.stringify is ECMAScript's serializer,
// keys sorted by UTF-16 code units (what Array.prototype.sort does with strings).
const canon = (v) => v === null || typeof v !== "object" ? JSON.stringify(v)
  : Array.isArray(v) ? "[" + v.map(canon).join(",") + "]"
  : "{" + Object.keys(v).sort().map((k) => JSON.stringify(k) + ":" + canon(v[k])).join(",") + "}";
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(cases.map((c) => {
  const { sig, ...rest } = JSON.parse(c.payload);
  return Buffer.from(canon(rest), "utf8").toString("hex");
})));
"""


def test_a_javascript_engine_makes_the_same_canonical_bytes() -> None:
    node = require_program("node", "/usr/bin/node")
    done = subprocess.run([node, "-e", JS_CANONICALIZE], input=json.dumps(VALID), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [c["canonical_hex"] for c in VALID]
