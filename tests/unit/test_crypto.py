"""Unit tests for secrets at rest (worker.crypto): encryption, key rotation, clear errors."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from worker.crypto import SecretBox, SecretKeyError

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()
PASSWORD = "hunter2-Pässwörd!"


@pytest.mark.parametrize("plaintext", [PASSWORD, "", "x" * 10_000, "日本語のパスワード"])
def test_encrypt_then_decrypt_returns_the_plaintext(plaintext):
    box = SecretBox([KEY_A])
    assert box.decrypt(box.encrypt(plaintext)) == plaintext


def test_ciphertext_does_not_contain_the_plaintext():
    token = SecretBox([KEY_A]).encrypt("hunter2hunter2")
    assert "hunter2" not in token
    assert isinstance(token, str)
    token.encode("ascii")  # stored as text


def test_same_secret_encrypts_differently_each_time():
    box = SecretBox([KEY_A])
    assert box.encrypt(PASSWORD) != box.encrypt(PASSWORD)


def test_old_key_still_decrypts_after_a_new_key_is_added_first():
    token = SecretBox([KEY_A]).encrypt(PASSWORD)
    assert SecretBox([KEY_B, KEY_A]).decrypt(token) == PASSWORD


def test_new_key_encrypts_during_rotation():
    token = SecretBox([KEY_B, KEY_A]).encrypt(PASSWORD)
    assert SecretBox([KEY_B]).decrypt(token) == PASSWORD
    with pytest.raises(SecretKeyError):
        SecretBox([KEY_A]).decrypt(token)


def test_rotate_reencrypts_under_the_newest_key():
    old_token = SecretBox([KEY_A]).encrypt(PASSWORD)
    new_token = SecretBox([KEY_B, KEY_A]).rotate(old_token)
    assert new_token != old_token
    assert SecretBox([KEY_B]).decrypt(new_token) == PASSWORD


def test_decrypt_with_only_the_new_key_explains_what_went_wrong():
    token = SecretBox([KEY_A]).encrypt(PASSWORD)
    with pytest.raises(SecretKeyError) as info:
        SecretBox([KEY_B]).decrypt(token)
    message = str(info.value)
    assert "OUTBOX_SECRET_KEY" in message
    assert "OUTBOX_SECRET_KEY=new,old" in message
    assert message.endswith("?")


def test_rotate_without_the_old_key_raises_secret_key_error():
    token = SecretBox([KEY_A]).encrypt(PASSWORD)
    with pytest.raises(SecretKeyError):
        SecretBox([KEY_B]).rotate(token)


def test_tampered_token_raises_secret_key_error():
    box = SecretBox([KEY_A])
    token = box.encrypt(PASSWORD)
    tampered = token[:-5] + ("A" if token[-5] != "A" else "B") + token[-4:]
    with pytest.raises(SecretKeyError):
        box.decrypt(tampered)


def test_repr_hides_the_keys():
    box = SecretBox([KEY_B, KEY_A])
    assert KEY_A not in repr(box)
    assert KEY_B not in repr(box)
    assert repr(box) == "SecretBox(<keys hidden>)"
    assert KEY_A not in str(box)


def test_at_least_one_key_is_required():
    with pytest.raises(ValueError):
        SecretBox([])


def test_malformed_key_is_refused():
    with pytest.raises(ValueError):
        SecretBox(["not-a-fernet-key"])
