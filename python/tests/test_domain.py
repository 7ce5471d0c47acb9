"""Domain.handle basics: QMP dicts in, outputs as dicts; a refused request is an answer, while
input that is not one of the documented shapes raises ValueError."""

import pytest

import vbackup_core

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""},
        "capabilities": [],
    }
}
IMAGE = "/images/vda.qcow2"
NODE = {
    "node-name": "vda-format",
    "drv": "qcow2",
    "file": IMAGE,
    "ro": False,
    "dirty-bitmaps": [],
    "image": {"filename": IMAGE, "format": "qcow2", "virtual-size": 1 << 20},
}
DOMAIN_XML = """<domain type='kvm'>
  <name>vm</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def new_domain():
    return vbackup_core.Domain(
        {"name": "vm", "disks": {"vda": {"node-name": "vda-format", "path": IMAGE}}}
    )


def sends(outputs):
    return [o["send"] for o in outputs if "send" in o]


def answers(outputs):
    return [o["respond"] for o in outputs if "respond" in o]


def connect(domain, now=1000):
    """Greeting, qmp_capabilities, and the reconcile's node query, answered."""
    (caps,) = sends(domain.handle(now, GREETING))
    assert caps == {"execute": "qmp_capabilities", "id": caps["id"]}
    (query,) = sends(domain.handle(now + 1, {"return": {}, "id": caps["id"]}))
    assert query["execute"] == "query-named-block-nodes"
    assert domain.handle(now + 2, {"return": [NODE], "id": query["id"]}) == []
    assert domain.connected


def test_a_greeting_starts_negotiation_and_sets_a_deadline():
    domain = new_domain()
    assert domain.next_deadline() is None
    assert not domain.connected
    (caps,) = sends(domain.handle(5000, GREETING))
    assert caps["execute"] == "qmp_capabilities"
    assert domain.next_deadline() == 5000 + 60000


def test_the_bare_inputs_are_accepted_as_strings_and_dicts():
    domain = new_domain()
    assert sends(domain.handle(0, "reconnected"))[0]["execute"] == "qmp_capabilities"
    assert domain.handle(1, {"link-down": {}}) == []
    assert sends(domain.handle(2, {"reconnected": True}))[0]["execute"] == "qmp_capabilities"
    assert domain.handle(3, "tick") == []


def test_a_checkpoint_request_sends_a_transaction_and_its_reply_completes_it():
    domain = new_domain()
    connect(domain)
    xml = "<domaincheckpoint><name>c1</name><description>first</description></domaincheckpoint>"
    outputs = domain.handle(2000, {"request": "checkpoint-create", "id": 7, "xml": xml})
    assert outputs[0] == {"persist": {"op": "set-pending-checkpoints", "names": ["c1"]}}
    (tx,) = sends(outputs)
    assert tx["execute"] == "transaction"
    assert tx["arguments"]["actions"] == [
        {
            "type": "block-dirty-bitmap-add",
            "data": {"node": "vda-format", "name": "c1", "persistent": True, "disabled": False},
        }
    ]
    outputs = domain.handle(2001, {"return": {}, "id": tx["id"]})
    put = next(o["persist"] for o in outputs if o.get("persist", {}).get("op") == "put-checkpoint")
    assert put["name"] == "c1" and "<description>first</description>" in put["xml"]
    assert {"emit": {"event": "checkpoint-created", "name": "c1"}} in outputs
    (answer,) = answers(outputs)
    assert answer["id"] == 7 and answer["ok"]["checkpoint"]["name"] == "c1"
    assert domain.checkpoints == ["c1"] and domain.current_checkpoint == "c1"

    (lookup,) = answers(domain.handle(2002, {"request": "checkpoint-get-xml", "id": 8, "name": "c1"}))
    assert lookup["ok"]["checkpoint"]["name"] == "c1"
    assert lookup["ok"]["checkpoint"]["parent"] is None
    assert "<name>c1</name>" in lookup["ok"]["checkpoint"]["xml"]
    (names,) = answers(domain.handle(2003, {"request": "checkpoint-list", "id": 9}))
    assert names == {"id": 9, "ok": {"names": ["c1"]}}


def test_a_qemu_error_reply_is_an_error_answer():
    domain = new_domain()
    connect(domain)
    (tx,) = sends(domain.handle(2000, {"request": "checkpoint-create", "id": 1,
                                        "xml": "<domaincheckpoint><name>c1</name></domaincheckpoint>"}))
    reply = {"error": {"class": "GenericError", "desc": "Bitmap already exists: c1"}, "id": tx["id"]}
    (answer,) = answers(domain.handle(2001, reply))
    assert answer["id"] == 1
    assert answer["error"]["kind"] == "qemu-refused"
    assert answer["error"]["desc"] == "Bitmap already exists: c1"
    assert domain.checkpoints == []


def test_a_bad_request_is_an_error_answer_not_an_exception():
    domain = new_domain()
    connect(domain)
    (answer,) = answers(domain.handle(2000, {"request": "checkpoint-delete", "id": 3, "name": "nope"}))
    assert answer == {
        "id": 3,
        "error": {"kind": "request", "message": "no domain checkpoint with matching name 'nope'"},
    }
    bad_xml = {"request": "checkpoint-create", "id": 4, "xml": "<domaincheckpoint><bogus/></domaincheckpoint>"}
    (answer,) = answers(domain.handle(2001, bad_xml))
    assert answer["id"] == 4 and answer["error"]["kind"] == "request"
    assert "/domaincheckpoint/bogus" in answer["error"]["message"]
    (answer,) = answers(domain.handle(2002, {"request": "backup-begin", "id": 5, "xml": "<domainbackup><incremental>none</incremental></domainbackup>"}))
    assert answer["id"] == 5 and "error" in answer


def test_a_backup_before_the_session_is_up_is_refused():
    domain = new_domain()
    (answer,) = answers(domain.handle(0, {"request": "backup-begin", "id": 1}))
    assert answer["error"]["kind"] == "request"


def test_a_push_backup_creates_its_target_through_a_file_output():
    domain = new_domain()
    connect(domain)
    xml = ("<domainbackup><disks><disk name='vda' type='file'>"
           "<target file='/backups/full.qcow2'/><driver type='qcow2'/></disk></disks></domainbackup>")
    (query,) = sends(domain.handle(3000, {"request": "backup-begin", "id": 1, "xml": xml}))
    assert query["execute"] == "query-named-block-nodes"
    outputs = domain.handle(3001, {"return": [NODE], "id": query["id"]})
    files = [o["file"] for o in outputs if "file" in o]
    assert [(f["op"], f["path"]) for f in files] == [("create-exclusive", "/backups/full.qcow2")]
    assert any(o.get("persist", {}).get("op") == "put-backup-journal" for o in outputs)
    outputs = domain.handle(3002, {"file-done": {"id": files[0]["id"]}})
    assert sends(outputs), "after the target file exists the engine talks to QEMU"
    (answer,) = answers(domain.handle(3003, {"request": "backup-get-xml", "id": 2}))
    assert "/backups/full.qcow2" in answer["ok"]["backup"]["xml"]
    assert answer["ok"]["backup"]["plan"]["mode"] == "push"


def test_events_and_stray_replies_are_accepted():
    domain = new_domain()
    connect(domain)
    event = {"event": "JOB_STATUS_CHANGE", "data": {"id": "x", "status": "running"},
             "timestamp": {"seconds": 1, "microseconds": 0}}
    assert domain.handle(2000, event) == []
    assert domain.handle(2001, {"return": {}, "id": 999}) == []
    assert domain.handle(2002, {"return": {}}) == []


def test_an_unanswered_command_times_out_on_tick():
    domain = new_domain()
    connect(domain)
    (tx,) = sends(domain.handle(2000, {"request": "checkpoint-create", "id": 1,
                                        "xml": "<domaincheckpoint><name>c1</name></domaincheckpoint>"}))
    deadline = domain.next_deadline()
    assert deadline == 2000 + 60000
    assert domain.handle(deadline - 1, "tick") == []
    outputs = domain.handle(deadline, "tick")
    assert [a["id"] for a in answers(outputs)] == [1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"request": "checkpoint-delete", "name": "x"}, "'id' is required"),
        ({"request": "no-such-request", "id": 1}, "unknown request 'no-such-request'"),
        ({"request": "checkpoint-lookup", "id": 1, "name": "x", "extra": 1}, "unknown key 'extra'"),
        ({"request": "checkpoint-lookup", "id": 1, "name": 3}, "'name' must be a str"),
        ({"request": "checkpoint-create", "id": 1}, "'xml' is required"),
        ({"request": "abort-job", "id": -1}, "'id' must be a non-negative int"),
        ({"request": "checkpoint-delete", "id": 1, "name": "x", "scope": "all"}, "scope 'all'"),
        ({"file-done": {"path": "/x"}}, "'id' is required"),
        ({"nothing": 1}, "unknown input"),
        ("explode", "unknown input 'explode'"),
        (42, "input must be a dict"),
        ({1: 2}, "is not a str"),
        ({"request": "abort-job", "id": {1, 2}}, "no JSON form"),
        ({"event": 5}, "not a QMP message"),
    ],
)
def test_malformed_input_raises_value_error(bad, message):
    domain = new_domain()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        domain.handle(0, bad)


def test_a_domain_from_xml_needs_node_names():
    with pytest.raises(ValueError, match="node_names"):
        vbackup_core.Domain(DOMAIN_XML)
    domain = vbackup_core.Domain(DOMAIN_XML, node_names={"vda": "libvirt-1-format"})
    (disk,) = domain.definition()["disks"]
    assert disk["target"] == "vda"
    assert disk["layers"][0]["node_name"] == "libvirt-1-format"
    assert disk["layers"][0]["path"] == "/images/vda.qcow2"
    with pytest.raises(ValueError, match="no disk 'vdz'"):
        vbackup_core.Domain(DOMAIN_XML, node_names={"vdz": "x"})
    with pytest.raises(ValueError, match="domain"):
        vbackup_core.Domain("<domain/>")


def test_checkpoints_from_xml_embed_the_domain():
    domain = vbackup_core.Domain(DOMAIN_XML, node_names={"vda": "vda-format"})
    connect(domain)
    (tx,) = sends(domain.handle(1_700_000_000_000, {"request": "checkpoint-create", "id": 1,
                                                     "xml": "<domaincheckpoint/>"}))
    name = tx["arguments"]["actions"][0]["data"]["name"]
    assert name == "1700000000", "an unnamed checkpoint is named after now_ms in seconds"
    outputs = domain.handle(1_700_000_000_001, {"return": {}, "id": tx["id"]})
    put = next(o["persist"] for o in outputs if o.get("persist", {}).get("op") == "put-checkpoint")
    assert "<domain type='kvm'>" in put["xml"]


def test_a_restarted_domain_keeps_its_stored_checkpoints():
    first = new_domain()
    connect(first)
    stored = {}
    for i, name in enumerate(["c1", "c2"]):
        (tx,) = sends(first.handle(2000 + i, {"request": "checkpoint-create", "id": i,
                                              "xml": f"<domaincheckpoint><name>{name}</name></domaincheckpoint>"}))
        for o in first.handle(2100 + i, {"return": {}, "id": tx["id"]}):
            if o.get("persist", {}).get("op") == "put-checkpoint":
                stored[o["persist"]["name"]] = o["persist"]["xml"]
    second = vbackup_core.Domain(
        {"name": "vm", "disks": {"vda": {"node-name": "vda-format", "path": IMAGE}}},
        checkpoints=list(stored.values()),
        current="c2",
    )
    assert second.checkpoints == ["c1", "c2"]
    assert second.current_checkpoint == "c2"
    with pytest.raises(ValueError, match=r"checkpoints\[0\]"):
        vbackup_core.Domain({"name": "vm", "disks": {"vda": "n"}}, checkpoints=["<bogus/>"])


def test_definitions_and_config_are_checked():
    with pytest.raises(ValueError, match="'disks' is required"):
        vbackup_core.Domain({"name": "vm"})
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        vbackup_core.Domain({"name": "vm", "disks": {"vda": {"node-name": "n", "colour": "red"}}})
    with pytest.raises(ValueError, match="push-write"):
        vbackup_core.Domain({"name": "vm", "disks": {"vda": "n"}}, config={"push-write": "later"})
    domain = vbackup_core.Domain(
        {"name": "vm", "disks": {"vda": ["top-node", {"node-name": "base-node", "path": "/b.qcow2"}]}},
        config={"command-timeout-ms": 5000, "push-write": "qemu-flushes"},
    )
    assert [l["node_name"] for l in domain.definition()["disks"][0]["layers"]] == ["top-node", "base-node"]
    domain.handle(0, GREETING)
    assert domain.next_deadline() == 5000


def test_a_restarted_domain_resumes_a_journaled_backup():
    domain = new_domain()
    connect(domain)
    (query,) = sends(domain.handle(3000, {"request": "backup-begin", "id": 1}))
    journals = [
        o["persist"]["journal"]
        for o in domain.handle(3001, {"return": [NODE], "id": query["id"]})
        if o.get("persist", {}).get("op") == "put-backup-journal"
    ]
    assert journals, "a backup is journaled before its first target is created"
    restarted = vbackup_core.Domain(
        {"name": "vm", "disks": {"vda": {"node-name": "vda-format", "path": IMAGE}}},
        journal=journals[-1],
    )
    assert restarted.backup_waiting_for() is not None
    assert domain.backup_waiting_for() is not None and new_domain().backup_waiting_for() is None
    with pytest.raises(ValueError, match="journal"):
        vbackup_core.Domain({"name": "vm", "disks": {"vda": "n"}}, journal={"mode": "sideways"})


def test_a_failed_file_operation_fails_the_backup_request():
    domain = new_domain()
    connect(domain)
    (query,) = sends(domain.handle(3000, {"request": "backup-begin", "id": 1}))
    outputs = domain.handle(3001, {"return": [NODE], "id": query["id"]})
    (create,) = [o["file"] for o in outputs if "file" in o]
    assert create["op"] == "create-exclusive" and create["path"].startswith("/images/vda.")
    outputs = domain.handle(3002, {"file-done": {"id": create["id"], "error": "File exists"}})
    (answer,) = answers(outputs)
    assert answer["id"] == 1 and "File exists" in answer["error"]["message"]


@pytest.mark.parametrize("kind", ["already-exists", "no-space", "other"])
def test_a_failed_file_operation_carries_its_kind_and_path(kind):
    domain = new_domain()
    connect(domain)
    (query,) = sends(domain.handle(3000, {"request": "backup-begin", "id": 1}))
    outputs = domain.handle(3001, {"return": [NODE], "id": query["id"]})
    (create,) = [o["file"] for o in outputs if "file" in o]
    done = {"id": create["id"], "error": "refused here", "kind": kind, "path": create["path"]}
    (answer,) = answers(domain.handle(3002, {"file-done": done}))
    assert answer["id"] == 1 and "refused here" in answer["error"]["message"]


def test_an_unknown_file_error_kind_is_refused():
    domain = new_domain()
    with pytest.raises(ValueError, match="unknown kind 'sideways'"):
        domain.handle(3000, {"file-done": {"id": 1, "error": "x", "kind": "sideways"}})


def test_the_package_has_a_version_and_type_stubs():
    import importlib.resources

    assert vbackup_core.__version__ == "0.1.0"
    files = importlib.resources.files("vbackup_core")
    assert files.joinpath("py.typed").is_file()
