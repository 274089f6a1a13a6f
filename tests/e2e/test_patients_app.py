"""The Teams Patients-app flow end to end, with real client libraries, through fhir-edge to two real
FHIR servers (sekmet-fhir) holding different synthetic patients (carebundle) for two tenants.

Discovery (fhirclient: strict R4 parse of /metadata, oauth-uris) → token (requests-oauthlib with
client_secret_post, authlib with client_secret_basic) → the app's queries (fhirpy; it refuses to follow
a link outside its base URL, so paging through it proves the upstream links were rewritten) → tenant
isolation.
"""

import os
from urllib.parse import urlparse

import pytest
import requests
from fhirpy import SyncFHIRClient
from fhirclient import client as smart_client
from fhirclient.auth import FHIRAuth
from fhirclient.models.observation import Observation

from fixtures import TENANT_A, TENANT_B

os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"  # the test proxy listens on plain http


def discover_token_url(base):
    smart = smart_client.FHIRClient(settings={"app_id": "teams-patients-app", "api_base": base})
    statement = smart.server.capabilityStatement  # strict R4 model parse
    state = {"app_id": "teams-patients-app"}
    FHIRAuth.from_capability_security(statement.rest[0].security, state)
    return state["token_uri"], state


def token_post(world, tenant):
    from oauthlib.oauth2 import BackendApplicationClient
    from requests_oauthlib import OAuth2Session

    token_url, _ = discover_token_url(world.edge.base)
    s = OAuth2Session(client=BackendApplicationClient(client_id=world.edge.client_id, scope=[tenant]))
    return s.fetch_token(token_url, client_id=world.edge.client_id, client_secret=world.edge.client_secret,
                         include_client_id=True, scope=[tenant])


def token_basic(world, tenant):
    from authlib.integrations.requests_client import OAuth2Session

    token_url, _ = discover_token_url(world.edge.base)
    s = OAuth2Session(world.edge.client_id, world.edge.client_secret,
                      token_endpoint_auth_method="client_secret_basic", scope=tenant)
    return s.fetch_token(token_url, grant_type="client_credentials")


@pytest.fixture(scope="module")
def tok(world):
    return {TENANT_A: token_post(world, TENANT_A)["access_token"],
            TENANT_B: token_basic(world, TENANT_B)["access_token"]}


def fhir(world, tenant, tok):
    return SyncFHIRClient(world.edge.base, authorization=f"Bearer {tok[tenant]}")


def bearer(tok, tenant):
    return {"Authorization": f"Bearer {tok[tenant]}", "Accept": "application/fhir+json"}


def test_discovery_points_at_fhir_edge(world):
    token_url, state = discover_token_url(world.edge.base)
    assert token_url == f"{world.edge.base}/token"
    assert state["authorize_uri"] == f"{world.edge.base}/authorize"
    assert state["registration_uri"] == f"{world.edge.base}/register"
    st = requests.get(f"{world.edge.base}/metadata").json()
    assert st["implementation"]["url"] == world.edge.base
    assert world.a.base not in str(st), "the upstream address leaked through /metadata"
    sc = requests.get(f"{world.edge.base}/.well-known/smart-configuration").json()
    assert sc["token_endpoint"] == token_url


def test_both_client_authentication_methods_get_bearer_tokens(world):
    post = token_post(world, TENANT_A)
    basic = token_basic(world, TENANT_B)
    for t, tenant in ((post, TENANT_A), (basic, TENANT_B)):
        assert t["token_type"] == "Bearer"
        assert t["scope"] in (tenant, [tenant])
        assert t["expires_in"] > 0


def test_patient_search_read_and_search_by_post(world, tok):
    client = fhir(world, TENANT_A, tok)
    patients = client.resources("Patient").fetch_all()
    assert {p.id for p in patients} == set(world.a_patients)
    some = patients[0]
    family = some["name"][0]["family"]
    by_name = client.resources("Patient").search(name=family).fetch_all()
    assert some.id in {p.id for p in by_name}
    read = client.reference("Patient", some.id).to_resource()
    assert read.id == some.id
    # POST [type]/_search with a form body, as the Patients app sends it.
    r = requests.post(f"{world.edge.base}/Patient/_search", data={"name": family, "_count": "5"},
                      headers=bearer(tok, TENANT_A))
    assert r.status_code == 200
    bundle = r.json()
    assert some.id in {e["resource"]["id"] for e in bundle["entry"]}
    for e in bundle["entry"]:
        assert e["fullUrl"].startswith(world.edge.base + "/Patient/")


def test_vital_signs_page_through_fhir_edge(world, tok):
    client = fhir(world, TENANT_A, tok)
    pid = world.a_patients[0]
    search = client.resources("Observation").search(patient=pid, category="vital-signs").sort("-date").limit(2)
    first = search.fetch_raw()
    assert first["link"], "no paging links"
    for link in first["link"]:
        assert link["url"].startswith(world.edge.base), link["url"]
    total = first.get("total")
    everything = search.fetch_all()  # fhirpy follows next links only inside its base URL
    assert total and len(everything) == total > 2
    dates = [o.get("effectiveDateTime", "") for o in everything]
    assert dates == sorted(dates, reverse=True)
    # And Python fhirclient, which follows absolute next links with the bearer token attached.
    smart = smart_client.FHIRClient(settings={"app_id": "teams", "api_base": world.edge.base})
    smart.server.session.headers["Authorization"] = f"Bearer {tok[TENANT_A]}"
    seen = list(Observation.where({"patient": pid, "category": "vital-signs", "_count": "2"})
                .perform_resources_iter(smart.server))
    assert len(seen) == total


@pytest.mark.parametrize("resource,param", [
    ("Condition", "patient"), ("Encounter", "patient"), ("AllergyIntolerance", "patient"),
    ("MedicationRequest", "patient"), ("Coverage", "beneficiary"),
])
def test_clinical_resources_by_patient(world, tok, resource, param):
    pid = world.a_patients[0]
    query = {param: pid, "_count": "5"}
    if resource == "Encounter":
        query.update({"_sort": "-date", "_count": "1"})
    r = requests.get(f"{world.edge.base}/{resource}", params=query, headers=bearer(tok, TENANT_A))
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle.get("entry"), f"no {resource} for the patient"
    for e in bundle["entry"]:
        assert e["resource"]["resourceType"] == resource
        assert e["fullUrl"].startswith(world.edge.base)


def test_a_batch_of_reads_returns_a_batch_response(world, tok):
    pid = world.a_patients[0]
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        {"request": {"method": "GET", "url": f"Condition?patient={pid}"}},
        {"request": {"method": "GET", "url": f"Observation?patient={pid}&category=vital-signs&_count=1"}},
    ]}
    r = requests.post(world.edge.base, json=batch,
                      headers={**bearer(tok, TENANT_A), "Content-Type": "application/fhir+json"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "batch-response"
    assert [e["response"]["status"].split()[0] for e in out["entry"]] == ["200", "200", "200"]
    assert world.a.base not in r.text, "an upstream URL leaked through the batch response"
    # A batch that writes is refused on this read-only route, and nothing is created.
    write = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": f"Patient/{pid}"}}]}
    r = requests.post(world.edge.base, json=write,
                      headers={**bearer(tok, TENANT_A), "Content-Type": "application/fhir+json"})
    assert r.status_code == 405
    assert requests.get(f"{world.a.base}/Patient/{pid}").status_code == 200


def test_tenant_a_never_sees_tenant_b(world, tok):
    a = {p.id for p in fhir(world, TENANT_A, tok).resources("Patient").fetch_all()}
    b = {p.id for p in fhir(world, TENANT_B, tok).resources("Patient").fetch_all()}
    assert a == set(world.a_patients) and b == set(world.b_patients)
    assert not a & b
    # B's patient with A's token: A's server answers, and it has no such patient.
    r = requests.get(f"{world.edge.base}/Patient/{world.b_patients[0]}", headers=bearer(tok, TENANT_A))
    assert r.status_code == 404
    # A next link from A's search followed with B's token goes to B's server (the token decides).
    page = requests.get(f"{world.edge.base}/Patient", params={"_count": "1"}, headers=bearer(tok, TENANT_A)).json()
    nxt = next(l["url"] for l in page["link"] if l["relation"] == "next")
    assert urlparse(nxt).netloc == urlparse(world.edge.base).netloc
    other = requests.get(nxt, headers=bearer(tok, TENANT_B)).json()
    assert {e["resource"]["id"] for e in other.get("entry", [])} <= set(world.b_patients)
    # A token for one tenant cannot be stretched: no token endpoint call grants a tenant not asked for.
    r = requests.get(f"{world.edge.base}/Patient", headers={"Authorization": "Bearer " + tok[TENANT_A][:-4] + "AAAA"})
    assert r.status_code == 401


def test_no_token_no_data_and_nothing_sensitive_in_the_log(world, tok):
    r = requests.get(f"{world.edge.base}/Patient", params={"name": "CanaryFamilyName"})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    requests.get(f"{world.edge.base}/Patient", params={"name": "CanaryFamilyName"}, headers=bearer(tok, TENANT_A))
    logs = world.edge.logs()
    assert "CanaryFamilyName" not in logs
    assert tok[TENANT_A] not in logs and world.edge.client_secret not in logs
