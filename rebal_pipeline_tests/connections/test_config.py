"""The connections file: validated at the boundary, secrets only by env variable name."""

import pytest

from rebal_pipeline.connections.config import ConnectionsFileError, load_connections


def test_a_valid_file_loads_and_no_file_means_no_connections(tmp_path):
    path = tmp_path / "connections.yaml"
    assert load_connections(path).connections == []
    path.write_text("""connections:
  - name: schwab-main
    firm: example-ria
    custodian: schwab
    dialect: schwab
    kind: sftp
    expected_by: "07:30"
    sftp: {host: sftp.example, username: ria, private_key_file_env: REBAL_SCHWAB_KEY,
           known_hosts_file: /etc/rebal/known_hosts, remote_dir: /outbound, pattern: "*.csv"}
""")
    [schwab] = load_connections(path).connections
    assert (schwab.name, schwab.sftp.port, schwab.expected_by.hour) == ("schwab-main", 22, 7)


@pytest.mark.parametrize("body, problem", [
    ("connections:\n  - {name: x, firm: f, custodian: c, dialect: schwab, kind: sftp}\n", "needs an sftp section"),
    ("connections:\n  - {name: x, firm: f, custodian: c, dialect: dbf, kind: drop_folder}\n", "dialect"),
    ("connections:\n  - {name: x, firm: f, custodian: c, dialect: schwab, kind: drop_folder, password: hunter2}\n",
     "password"),
])
def test_a_bad_file_fails_naming_the_file_and_the_field(tmp_path, body, problem):
    path = tmp_path / "connections.yaml"
    path.write_text(body)
    with pytest.raises(ConnectionsFileError) as error:
        load_connections(path)
    assert str(path) in str(error.value) and problem in str(error.value)
    assert "hunter2" not in str(error.value)
