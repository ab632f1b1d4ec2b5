"""A host's requests, counted at the wire: an HTTP proxy between its storage stack and the
bucket (moto), recording every request by method and key."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.moto_server import Moto
from tests.support.s3_proxy import S3Proxy


class Wire:
    """A host's link to the bucket (a proxy in front of moto) and what the host asked on it:
    (method, key), a listing as ("LIST", prefix). Keys without the bucket's name."""

    def __init__(self, moto: Moto) -> None:
        self.proxy = S3Proxy(moto.url)
        self.url = self.proxy.url
        self.seen: list[tuple[str, str]] = []
        self.proxy.refuse = self._see

    def _see(self, method: str, path: str) -> bool:
        url = urlsplit(path)
        query = parse_qs(url.query)
        if method == "GET" and "list-type" in query:
            self.seen.append(("LIST", query.get("prefix", [""])[0]))
        else:
            self.seen.append((method, unquote(url.path).split("/", 2)[-1]))
        return False

    def lists(self) -> list[str]:
        return sorted(p for m, p in self.seen if m == "LIST")

    def keys_touched(self) -> set[str]:
        return {k for m, k in self.seen if m != "LIST"}
