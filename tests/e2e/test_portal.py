"""The registration portal in a real browser (Selenium driving Debian's chromium), end to end.

One owner's journey, in ordered steps that share the browser: the operator invites the owner with
`fhir-edge portal invite` → the owner opens the link and chooses a password → turns on two-step
sign-in (pyotp plays the authenticator app) and is shown recovery codes → signs out and back in with a
recovery code → creates a client for the tenant, reads its id and secret off the page → gets a token
with that secret (requests-oauthlib) and reads Patients from the real FHIR server (sekmet-fhir) through
fhir-edge → adds a second secret, switches over, revokes the first (the first secret and the token it
got stop working at once; the new one works, and the page shows when it was last used) → a client
named with markup is shown as text, and the only secret of a client cannot be revoked, the client can
be deleted → the activity and account pages → signs out (the old session cookie opens nothing) and
back in with an authenticator code. Then, without a browser: an owner of another tenant sees none of
it, and forms without the session's CSRF token or sent cross-site are refused.

Every page visited is saved as a 1280x900 screenshot: in docs/portal/ (which the portal's documentation
shows) when PORTAL_SCREENSHOTS=1, else in a temporary directory, so a test run leaves the tree clean.
Every page screenshotted, and the other states of a page the journey comes to (a refused form's message,
the empty list, a name with markup), is checked for accessibility by axe-core (tests/e2e/axe, pinned in its
package-lock.json, installed by scripts/setup) against the WCAG 2.1 A and AA rules: no violations at all.
"""

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pyotp
import pytest
import requests
from oauthlib.oauth2 import BackendApplicationClient, InvalidClientError
from requests_oauthlib import OAuth2Session
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from fixtures import REPO, TENANT_A, TENANT_B, Edge

os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"  # the test proxy listens on plain http

pytestmark = pytest.mark.incremental

# Screenshots go to the docs only when asked for (`PORTAL_SCREENSHOTS=1`): they hold the ids and times
# of a throwaway instance, which differ on every run.
SHOTS = (REPO / "docs" / "portal" if os.environ.get("PORTAL_SCREENSHOTS") == "1"
         else Path(tempfile.mkdtemp(prefix="fhir-edge-portal-shots-")))
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EMAIL = "owner@hospital.example"
PASSWORD = "seven blue kites over Lisbon"
MARKUP_NAME = "<script>alert(1)</script>"
WAIT = 20  # seconds for a page or an element
AXE_JS = REPO / "tests" / "e2e" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]
# Runs axe on the page and hands back its violations, each cut down to what a failure message needs.
# WebDriver's scripts are not subject to the page's Content-Security-Policy (`default-src 'none'`), so axe
# is injected into the page as it is served; the test checks that it did load.
AXE_RUN = """
const tags = arguments[0], done = arguments[arguments.length - 1];
axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']}).then(
  r => done({violations: r.violations.map(v => ({
    id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
    nodes: v.nodes.map(n => ({target: n.target, html: n.html, summary: n.failureSummary}))}))}),
  e => done({error: String(e && e.stack || e)}));
"""


# ---- fixtures ----


@pytest.fixture(scope="module")
def edge(world):
    """A fhir-edge of its own with the portal on, in front of the suite's two FHIR servers."""
    e = Edge(world.tmp, world.a, world.b, name="edge-portal", portal=True)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def browser(edge):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: scripts/setup installs chromium and chromium-driver")
    if not AXE_JS.exists():
        pytest.fail(f"{AXE_JS} is missing: scripts/setup installs it (npm ci in tests/e2e/axe)")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    # An explicit driver: without it Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield Browser(driver, edge.portal, AXE_JS.read_text())
    driver.quit()


@pytest.fixture(scope="module")
def journey():
    """What the steps learn and hand on: links, codes, ids, secrets, tokens."""
    return SimpleNamespace()


# ---- helpers ----


class Browser:
    """The browser on the portal: pages by path below the portal, forms submitted and waited for."""

    def __init__(self, driver, portal, axe_js):
        self.d = driver
        self.axe_js = axe_js
        self.portal = portal
        self.prefix = urlparse(portal).path

    def open(self, path_or_url):
        url = path_or_url if "://" in path_or_url else self.portal + path_or_url
        self.d.get(url)
        self.wait_page()

    def wait_page(self):
        WebDriverWait(self.d, WAIT).until(EC.presence_of_element_located((By.CSS_SELECTOR, "main h1")))

    def css(self, selector):
        return self.d.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector):
        return self.d.find_elements(By.CSS_SELECTOR, selector)

    def fill(self, selector, text):
        field = self.css(selector)
        field.clear()
        field.send_keys(text)

    def click_and_wait(self, element):
        """Clicks a submit button or a link and waits until the next page has replaced this one."""
        old = self.css("html")
        element.click()

        def replaced(_):
            try:
                old.is_enabled()
                return False
            except StaleElementReferenceException:
                return True
            except WebDriverException as e:
                # chromedriver, asked in the middle of the navigation, may say so instead of "stale".
                if "does not belong to the document" in str(e):
                    return True
                raise

        WebDriverWait(self.d, WAIT).until(replaced)
        self.wait_page()

    def submit(self, form_selector="main form"):
        self.click_and_wait(self.css(f"{form_selector} button[type=submit]"))

    def link(self, text):
        self.click_and_wait(self.d.find_element(By.LINK_TEXT, text))

    def sign_out(self):
        self.click_and_wait(self.css("header nav form button"))

    @property
    def path(self):
        """The current page's path (and query) below the portal."""
        u = urlparse(self.d.current_url)
        assert u.path.startswith(self.prefix), self.d.current_url
        return u.path[len(self.prefix):] + (f"?{u.query}" if u.query else "")

    def h1(self):
        return self.css("main h1").text

    def flash(self):
        found = self.all("main p.flash")
        return found[0].text if found else None

    def text(self):
        return self.css("main").text

    def shot(self, name):
        """Saves the page as docs/portal/<name>.png (no focus ring or caret on it), then checks it with axe."""
        self.d.execute_script("document.activeElement && document.activeElement.blur()")
        assert self.d.save_screenshot(str(SHOTS / f"{name}.png")), name
        self.accessible(name)

    def accessible(self, name):
        """Runs axe-core on the page as it is now (WCAG 2.1 A and AA) and fails on any violation."""
        if not self.d.execute_script("return typeof window.axe === 'object'"):
            self.d.execute_script(self.axe_js)
            assert self.d.execute_script("return typeof window.axe === 'object' && axe.version"), \
                f"{name}: axe-core did not load into the page"
        result = self.d.execute_async_script(AXE_RUN, AXE_TAGS)
        assert "error" not in result, f"{name}: axe.run failed: {result.get('error')}"
        found = result["violations"]
        assert not found, f"{name} ({self.path}): {len(found)} accessibility violation(s):\n" + axe_report(found)

    def table(self):
        """The page's first table body as rows of cell texts."""
        return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                for tr in self.all("main table tbody tr")]

    def secrets(self):
        """The client page's secrets: secret id → {description, created, expires, last_used}."""
        return {row[0]: dict(description=row[1], created=row[2], expires=row[3], last_used=row[4])
                for row in self.table()}

    def session_cookie(self):
        return self.d.get_cookie("fhir-edge-session")

    def sign_in(self, email, password, code):
        if not self.path.startswith("/login"):
            self.open("/login")
        self.fill("#email", email)
        self.fill("#password", password)
        self.fill("#code", code)


def axe_report(violations):
    """Each violation: rule id, impact, help and its page, then each element's selector, markup and what to fix."""
    lines = []
    for v in violations:
        lines.append(f"- {v['id']} ({v['impact']}): {v['help']} <{v['helpUrl']}>")
        for n in v["nodes"]:
            lines.append(f"    {' '.join(map(str, n['target']))}: {' '.join(n['html'].split())}")
            lines.extend(f"      {line}" for line in (n["summary"] or "").splitlines())
    return "\n".join(lines)


def portal_cli(edge, *args):
    out = subprocess.run([str(edge.bin), "portal", "-c", str(edge.config), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def fetch_token(edge, client_id, secret, tenant=TENANT_A):
    """A token as an app gets it: requests-oauthlib, client credentials, the client id and secret in the form."""
    s = OAuth2Session(client=BackendApplicationClient(client_id=client_id, scope=[tenant]))
    return s.fetch_token(f"{edge.base}/token", client_id=client_id, client_secret=secret,
                         include_client_id=True, scope=[tenant])["access_token"]


def token_response(edge, client_id, secret, tenant=TENANT_A):
    """The token endpoint's raw answer, the client authenticating with HTTP Basic."""
    return requests.post(f"{edge.base}/token", data={"grant_type": "client_credentials", "scope": tenant},
                         auth=(client_id, secret), timeout=30)


def patients(edge, token):
    return requests.get(f"{edge.base}/Patient", params={"_count": "1"}, timeout=30,
                        headers={"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"})


def wait_for_next_totp_step(after_step):
    """Each time step is accepted once per account: waits until the clock is past `after_step`."""
    while int(time.time()) // 30 <= after_step:
        time.sleep(0.5)


def hidden_csrf(html):
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def no_alert(driver):
    try:
        WebDriverWait(driver, 1).until(EC.alert_is_present())
    except TimeoutException:
        return True
    driver.switch_to.alert.dismiss()
    return False


# ---- the journey ----


def test_the_operator_invites_an_owner(edge, journey):
    out = portal_cli(edge, "invite", "--email", EMAIL, "--tenant", TENANT_A).splitlines()
    assert len(out) == 2, out
    assert out[0].startswith(f"Invited {EMAIL}. Send them this link (single use, until "), out[0]
    link = out[1]
    assert re.fullmatch(re.escape(edge.portal) + r"/invite/[A-Za-z0-9_-]{43}", link), link
    journey.invite = link
    accounts = json.loads(portal_cli(edge, "accounts", "--json"))
    assert [(a["email"], a["tenants"], a["password_set"], a["totp"]) for a in accounts] == \
        [(EMAIL, [TENANT_A], False, False)]
    # Nothing below the portal opens without a session.
    r = requests.get(f"{edge.portal}/clients", allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["location"] == f"{urlparse(edge.portal).path}/login"


def test_the_invitation_link_sets_the_password(browser, journey, edge):
    b = browser
    b.open(journey.invite)
    assert b.h1() == "Choose your password"
    assert EMAIL in b.text()
    b.fill("#password", PASSWORD)
    b.fill("#confirm", PASSWORD)
    b.shot("invite")
    # A password with the e-mail's local part is refused, and the form says why.
    b.fill("#password", "owner of the patients app")
    b.fill("#confirm", "owner of the patients app")
    b.submit()
    assert b.h1() == "Choose your password"
    assert "e-mail address" in b.flash()
    b.accessible("invite, refused")
    b.fill("#password", PASSWORD)
    b.fill("#confirm", PASSWORD)
    b.submit()
    assert b.path == "/account/totp", b.d.current_url
    cookie = b.session_cookie()
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == urlparse(edge.portal).path
    # The link worked once.
    r = requests.get(journey.invite, timeout=30)
    assert r.status_code == 404 and "Link not valid" in r.text


def test_two_step_sign_in_is_turned_on_with_an_authenticator(browser, journey):
    b = browser
    assert b.h1() == "Two-step sign-in"
    key = b.css("code#totp-key").text
    assert re.fullmatch(r"[A-Z2-7]{32}", key), key
    assert b.css("svg.qr").is_displayed()
    b.shot("totp")
    totp = pyotp.TOTP(key)
    # A wrong code keeps the same key on the page (the app scanned it already).
    b.fill("#code", f"{(int(totp.now()) + 1) % 1_000_000:06d}")
    b.submit()
    assert "not right" in b.flash()
    assert b.css("code#totp-key").text == key
    b.accessible("totp, refused")
    now = time.time()
    b.fill("#code", totp.at(now))
    journey.totp_step = int(now) // 30
    b.submit()
    assert b.h1() == "Save your recovery codes"
    codes = [c.text for c in b.all("ul.codes li code")]
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(re.fullmatch(r"[a-z2-9]{5}-[a-z2-9]{5}", c) for c in codes), codes
    b.shot("recovery-codes")
    journey.totp, journey.codes = totp, codes
    b.link("I saved them: go to my clients")
    assert b.path == "/clients"
    assert b.h1() == "My clients"
    assert "No clients yet." in b.text()
    # The operator's client for both tenants is not this owner's, so it is not listed.
    assert "teams-patients-app" not in b.text()
    b.accessible("clients, none yet")


def test_sign_out_and_in_again_with_a_recovery_code(browser, journey):
    b = browser
    b.sign_out()
    assert b.path == "/login?out"
    assert b.flash() == "Signed out."
    assert b.session_cookie() is None
    b.accessible("login, signed out")
    b.sign_in(EMAIL, PASSWORD, journey.codes[0].upper().replace("-", " "))  # typed loosely
    b.shot("login")
    # The password alone is not enough any more.
    b.fill("#code", "")
    b.submit()
    assert b.h1() == "Sign in" and "not right" in b.flash()
    b.accessible("login, refused")
    b.sign_in(EMAIL, PASSWORD, journey.codes[0].upper().replace("-", " "))
    b.submit()
    assert b.path == "/clients"
    assert b.h1() == "My clients"


def test_create_a_client_and_use_its_secret(browser, journey, edge, world):
    b = browser
    b.link("Create a client")
    assert b.path == "/clients/new"
    assert b.h1() == "Create a client"
    boxes = b.all("input[name=tenant]")
    assert [x.get_attribute("value") for x in boxes] == [TENANT_A]
    assert boxes[0].is_selected(), "the account's only tenant is not ticked"
    b.fill("#name", "patients-app-prod")
    b.fill("#description", "production")
    b.shot("new-client")
    b.submit()
    assert b.h1() == "Client created"
    client_id, secret_id = b.css("code#client-id").text, b.css("code#secret-id").text
    secret = b.css("code#client-secret").text
    assert client_id and secret_id and len(secret) >= 32
    assert f"{edge.base}/token" in b.text(), "the page names another token URL"
    b.shot("client-created")
    journey.client_id, journey.first_secret_id, journey.first_secret = client_id, secret_id, secret

    token = fetch_token(edge, client_id, secret)
    r = patients(edge, token)
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["entry"][0]["resource"]["resourceType"] == "Patient"
    assert bundle["entry"][0]["resource"]["id"] in world.a_patients
    # The client may ask only for the tenant it was created for.
    r = token_response(edge, client_id, secret, tenant=TENANT_B)
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope", r.text
    journey.first_token = token

    b.link("Go to the client")
    assert b.path == f"/clients/{client_id}"
    assert b.h1() == "patients-app-prod"
    assert b.css("code#client-id").text == client_id
    rows = b.secrets()
    assert list(rows) == [secret_id]
    assert rows[secret_id]["description"] == "production"
    assert rows[secret_id]["last_used"] != "never", "the token just issued is not shown as a use"
    # The secret is shown once: the client's page never has it.
    assert secret not in b.d.page_source


def test_rotate_the_secret_without_downtime(browser, journey, edge):
    b = browser
    assert b.path == f"/clients/{journey.client_id}"
    b.fill("#description", "rotated")
    b.click_and_wait(b.d.find_element(By.XPATH, "//button[normalize-space()='Add secret']"))
    assert b.h1() == "Secret added"
    assert b.css("code#client-id").text == journey.client_id
    new_id, new_secret = b.css("code#secret-id").text, b.css("code#client-secret").text
    assert new_id != journey.first_secret_id and new_secret != journey.first_secret
    b.shot("secret-added")

    # Both secrets work until the old one is revoked: the app switches over first.
    new_token = fetch_token(edge, journey.client_id, new_secret)
    assert patients(edge, new_token).status_code == 200
    assert patients(edge, journey.first_token).status_code == 200
    b.link("Go to the client")
    rows = b.secrets()
    assert set(rows) == {journey.first_secret_id, new_id}
    assert rows[new_id]["description"] == "rotated"
    assert rows[new_id]["last_used"] != "never"
    b.shot("client")

    # Revoking asks first, on a page of its own.
    b.click_and_wait(b.css(f'a[aria-label="Revoke secret {journey.first_secret_id}"]'))
    assert b.h1() == "Revoke a secret?"
    assert journey.first_secret_id in b.text()
    b.shot("revoke")
    b.click_and_wait(b.css("main form button[type=submit]"))
    assert b.path == f"/clients/{journey.client_id}"
    assert list(b.secrets()) == [new_id]

    # The revoked secret gets no token, and the token it got is refused at once.
    r = token_response(edge, journey.client_id, journey.first_secret)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client", r.text
    with pytest.raises(InvalidClientError):
        fetch_token(edge, journey.client_id, journey.first_secret)
    r = patients(edge, journey.first_token)
    assert r.status_code == 401, r.text
    # The new secret goes on working.
    r = token_response(edge, journey.client_id, new_secret)
    assert r.status_code == 200, r.text
    assert patients(edge, r.json()["access_token"]).status_code == 200
    b.open(f"/clients/{journey.client_id}")
    assert b.secrets()[new_id]["last_used"] != "never"
    journey.new_secret_id, journey.new_secret = new_id, new_secret


def test_a_name_with_markup_is_shown_as_text_and_the_client_can_be_deleted(browser, journey, edge):
    b = browser
    b.open("/clients")
    assert [row[0] for row in b.table()] == ["patients-app-prod"]
    b.shot("clients")
    b.link("Create a client")
    b.fill("#name", MARKUP_NAME)
    b.submit()
    assert b.h1() == "Client created"
    client_id, secret = b.css("code#client-id").text, b.css("code#client-secret").text
    assert MARKUP_NAME in b.text()
    assert not b.all("script"), "the name became a script element"
    assert no_alert(b.d)
    b.link("Go to the client")
    assert b.h1() == MARKUP_NAME
    assert b.d.title.startswith(MARKUP_NAME)
    assert not b.all("script") and no_alert(b.d)
    b.accessible("client, named with markup")
    # The only secret cannot be revoked: the page says what to do instead.
    (only,) = b.secrets()
    b.click_and_wait(b.css(f'a[aria-label="Revoke secret {only}"]'))
    b.click_and_wait(b.css("main form button[type=submit]"))
    assert "only secret" in b.flash()
    assert list(b.secrets()) == [only]
    b.accessible("client, only secret not revoked")
    b.open("/clients")
    names = [row[0] for row in b.table()]
    assert sorted(names) == sorted([MARKUP_NAME, "patients-app-prod"])
    assert not b.all("script") and no_alert(b.d)

    # Deleting asks for the box to be ticked; then the client and its secret are gone.
    b.open(f"/clients/{client_id}")
    b.submit(f"form[action$='/clients/{client_id}/delete']")
    assert "Tick the box" in b.flash()
    b.accessible("client, delete refused")
    b.css("#confirm").click()
    b.submit(f"form[action$='/clients/{client_id}/delete']")
    assert b.path == "/clients"
    assert [row[0] for row in b.table()] == ["patients-app-prod"]
    r = token_response(edge, client_id, secret)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client", r.text
    journey.deleted_client_id = client_id


def test_activity_and_account_pages(browser, journey):
    b = browser
    b.link("Activity")
    assert b.path == "/activity"
    rows = b.table()  # When, What, Client, Secret, From; newest first
    done = [(what, client, secret) for _, what, client, secret, _ in rows]
    c, s1, s2 = journey.client_id, journey.first_secret_id, journey.new_secret_id
    for entry in [("Client created", c, s1), ("Secret added", c, s2), ("Secret revoked", c, s1),
                  ("Client deleted", journey.deleted_client_id, ""), ("Two-step sign-in turned on", "", ""),
                  ("Password set from an invitation", "", ""), ("Invited by the operator", "", ""),
                  ("Signed in", "", ""), ("Failed sign-in", "", "")]:
        assert entry in done, (entry, done)
    assert done.index(("Secret revoked", c, s1)) < done.index(("Secret added", c, s2)) \
        < done.index(("Client created", c, s1)), "not newest first"
    assert rows[-1][1] == "Invited by the operator" and rows[-1][4] == "operator"
    assert rows[0][4] == "127.0.0.1"
    b.shot("activity")

    b.link("Account")
    assert b.path == "/account"
    text = b.text()
    assert EMAIL in text and f"hospital-a {TENANT_A}" in text
    assert b.d.find_element(By.XPATH, "//dt[.='Two-step sign-in']/following-sibling::dd[1]").text == "On"
    b.shot("account")


def test_signing_out_ends_the_session_and_codes_work_once(browser, journey, edge):
    b = browser
    old = b.session_cookie()
    assert old
    b.sign_out()
    assert b.path == "/login?out"
    # The old session cookie opens nothing, sent by a script or put back into the browser.
    r = requests.get(f"{edge.portal}/clients", cookies={old["name"]: old["value"]}, allow_redirects=False,
                     timeout=30)
    assert r.status_code == 303 and r.headers["location"].endswith("/login"), (r.status_code, r.headers)
    b.d.add_cookie({"name": old["name"], "value": old["value"], "path": old["path"]})
    b.open("/clients")
    assert b.path == "/login" and b.h1() == "Sign in"
    # A used recovery code does not sign in again.
    b.sign_in(EMAIL, PASSWORD, journey.codes[0])
    b.submit()
    assert b.h1() == "Sign in" and "not right" in b.flash()
    # An authenticator code does, in a time step after the one used to turn two-step sign-in on.
    wait_for_next_totp_step(journey.totp_step)
    code = journey.totp.now()
    b.sign_in(EMAIL, PASSWORD, code)
    b.submit()
    assert b.path == "/clients" and b.h1() == "My clients"
    # The same code (the same time step) does not sign in a second time.
    b.sign_out()
    b.sign_in(EMAIL, PASSWORD, code)
    b.submit()
    assert b.h1() == "Sign in" and "not right" in b.flash()
    accounts = json.loads(portal_cli(edge, "accounts", "--json"))
    assert [(a["email"], a["password_set"], a["totp"], a["disabled"]) for a in accounts] == \
        [(EMAIL, True, True, False)]


# ---- without a browser ----


def test_an_owner_of_another_tenant_sees_none_of_it(journey, edge):
    other = json.loads(portal_cli(edge, "--json", "invite", "--email", "it@clinic-b.example",
                                  "--tenant", TENANT_B))
    assert other["email"] == "it@clinic-b.example" and other["link"].startswith(f"{edge.portal}/invite/")
    s = requests.Session()
    page = s.get(other["link"], timeout=30)
    assert page.status_code == 200
    r = s.post(other["link"], data={"csrf": hidden_csrf(page.text), "password": "a river of quiet stones",
                                    "confirm": "a river of quiet stones"}, allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["location"].endswith("/account/totp"), r.status_code
    clients = s.get(f"{edge.portal}/clients", timeout=30)
    assert clients.status_code == 200 and "No clients yet." in clients.text
    assert journey.client_id not in clients.text
    # Another tenant's client is answered as if it did not exist, to look at or to change.
    assert s.get(f"{edge.portal}/clients/{journey.client_id}", timeout=30).status_code == 404
    csrf = hidden_csrf(clients.text)
    r = s.post(f"{edge.portal}/clients/{journey.client_id}/secrets", data={"csrf": csrf}, timeout=30)
    assert r.status_code == 404
    r = s.post(f"{edge.portal}/clients/{journey.client_id}/secrets/{journey.new_secret_id}/revoke",
               data={"csrf": csrf}, timeout=30)
    assert r.status_code == 404
    assert token_response(edge, journey.client_id, journey.new_secret).status_code == 200
    # A form without the session's CSRF token, or sent from another site, changes nothing.
    form = {"name": "sneaky", "tenant": TENANT_B, "expires_days": "30"}
    assert s.post(f"{edge.portal}/clients/new", data=form, timeout=30).status_code == 403
    r = s.post(f"{edge.portal}/clients/new", data={**form, "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"},
               timeout=30)
    assert r.status_code == 403
    assert "sneaky" not in s.get(f"{edge.portal}/clients", timeout=30).text
    # Not a tenant of this account: refused, not silently dropped.
    r = s.post(f"{edge.portal}/clients/new", data={**form, "csrf": csrf, "tenant": TENANT_A}, timeout=30)
    assert r.status_code == 404
    r = s.post(f"{edge.portal}/clients/new", data={**form, "csrf": csrf}, timeout=30)
    assert r.status_code == 201 and "Client created" in r.text
