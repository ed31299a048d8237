"""Replica choice in the teacher client, and expanding a headless Service's name into its pods (units; the
replicas against real services are in test_trainer_faults.py)."""

from __future__ import annotations

import asyncio
import socket

from services.teacher.client import TeacherClient
from trainer.teacher_link import resolved_replicas


def test_requests_go_to_the_replica_with_the_fewest_tokens_outstanding():
    async def go():
        async with TeacherClient(["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]) as client:
            a, b, c = client.replicas
            a.outstanding, b.outstanding, c.outstanding = 500, 20, 300
            assert await client._pick() is b
            b.down_until = 1e18  # out of service, its probe not yet due
            assert await client._pick() is c
            c.refused = "its model differs"
            assert await client._pick() is a

    asyncio.run(go())


def test_one_url_is_a_single_teacher_never_taken_out():
    async def go():
        async with TeacherClient("http://127.0.0.1:1") as client:
            (only,) = client.replicas
            client._take_out(only)  # only the retry loop of several replicas takes one out
            assert await client._pick() is only and client.url == "http://127.0.0.1:1"

    asyncio.run(go())


def test_a_headless_service_name_becomes_one_url_per_pod(monkeypatch):
    pods = {"tropd-teacher-pods": ["10.0.0.7", "10.0.0.5", "10.0.0.7"], "one": ["10.0.0.9"]}

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in pods:
            raise socket.gaierror("unknown")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in pods[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    urls = ["http://tropd-teacher-pods:8000", "http://one:8000", "http://unknown:8000"]
    assert resolved_replicas(urls) == [
        "http://10.0.0.5:8000",
        "http://10.0.0.7:8000",
        "http://one:8000",
        "http://unknown:8000",
    ]
