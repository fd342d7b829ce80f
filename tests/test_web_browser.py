"""`caffeish serve` in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's
chromedriver, against the app served by uvicorn on 127.0.0.1.

Opens a model page (its layer table and network picture, a click through to a layer), uploads an
image to a segmentation net (legend, hover read-out, opacity slider), builds a small dataset and
browses it, imports a model from a store served on 127.0.0.1, and starts a training job from a model
page, watches its curve grow, stops it and tests an image with its snapshot.  A screenshot of each page is
written under a temp folder ($CAFFEISH_SCREENSHOTS when set), named in the test's output.

Skips when chromium, chromedriver or selenium are missing, except under CI (the CI variable), where
that is a failure: .ci/run installs them.
"""
import os
import shutil
import tempfile
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _missing():
    missing = [p for p in (CHROMIUM, DRIVER) if not os.path.exists(p)]
    for module in ("selenium", "uvicorn", "starlette"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module}")
    return missing


if _missing():
    why = (f"the browser test needs {', '.join(_missing())} (apt-get install chromium chromium-driver; "
           f"pip install '.[test]')")
    if os.environ.get("CI"):
        raise RuntimeError(f"CI: {why}")  # a collection error: the run fails, it does not skip
    pytest.skip(why, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from caffeish.apps.store_server import StoreServer  # noqa: E402
from caffeish.web.app import Background, create_app  # noqa: E402
from test_web_workspace import FCN_LABELS, make_workspace, picture  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1300,1000"]


def chromium_driver(profile):
    """Headless Chromium with a fresh profile (this machine's network is closed: no updates, no sync)."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root, shop = make_workspace(tmp_path_factory.mktemp("browser") / "ws")
    with StoreServer(shop, port=0) as store:
        app = create_app(root, stores=[store.url], allowed_hosts=["127.0.0.1", "localhost"])
        with Background(app) as served:
            yield served.url, root


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tempfile.mkdtemp(prefix="caffeish-chromium-")
    driver = chromium_driver(profile)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = os.environ.get("CAFFEISH_SCREENSHOTS") or str(tmp_path_factory.mktemp("screenshots"))
    os.makedirs(folder, exist_ok=True)
    return folder


def screenshot(driver, folder, name):
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1300, min(max(height, 600), 6000))
    path = os.path.join(folder, f"{name}.png")
    driver.save_screenshot(path)
    driver.set_window_size(1300, 1000)
    print(f"screenshot: {path}")
    return path


def wait(driver, condition, seconds=60):
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d))


def test_model_page_has_its_layer_table_and_network_picture(browser, site, shots):
    url, _ = site
    browser.get(f"{url}/models/fcn")
    rows = browser.find_elements(By.CSS_SELECTOR, "#layer-table tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows][:3] == ["data", "data_data_0_split", "conv1"]
    boxes = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#net-picture svg g.node[id^='layer']"))
    assert len(boxes) == 6
    assert "relu1" in browser.find_element(By.ID, "net-picture").text  # folded into conv1's box
    assert "Crop crop: computed 1, the Crop says 1: agrees" in browser.find_element(By.ID, "offsets").text
    wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#weights img')].every(i => i.complete && i.naturalWidth > 0)"))
    screenshot(browser, shots, "model-page")
    conv1 = next(b for b in boxes if "conv1" in b.text)
    conv1.find_element(By.TAG_NAME, "a").click()
    wait(browser, lambda d: "/layers/" in d.current_url)
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("conv1")
    screenshot(browser, shots, "layer-page")


def test_segment_an_uploaded_image_and_read_the_legend(browser, site, shots, tmp_path):
    import numpy as np

    url, _ = site
    image = tmp_path / "street.png"
    picture(np.random.default_rng(11), (90, 120)).save(image)
    browser.get(f"{url}/models/fcn")
    browser.find_element(By.ID, "images").send_keys(str(image))
    browser.find_element(By.ID, "infer-submit").click()
    wait(browser, lambda d: "/results/" in d.current_url)
    legend = browser.find_elements(By.CSS_SELECTOR, "table.legend tbody tr")
    names = [r.find_elements(By.TAG_NAME, "td")[1].text for r in legend]
    assert names and all(n.split(" ", 1)[1] in FCN_LABELS for n in names)
    shares = [float(r.find_elements(By.TAG_NAME, "td")[3].text.rstrip("%")) for r in legend]
    assert abs(sum(shares) - 100) < 0.5
    classmap = browser.find_element(By.CSS_SELECTOR, "img.hover")
    wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", classmap))
    time.sleep(0.3)  # the class indices arrive by fetch
    ActionChains(browser).move_to_element_with_offset(classmap, 5, 5).perform()
    readout = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".readout").text.strip())
    assert any(label in readout for label in FCN_LABELS), readout
    slider = browser.find_element(By.CSS_SELECTOR, "input.opacity")
    browser.execute_script("arguments[0].value = 0.25; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert browser.find_element(By.CSS_SELECTOR, "img.top").value_of_css_property("opacity") == "0.25"
    screenshot(browser, shots, "segmentation-result")


def test_build_a_small_dataset_and_browse_it(browser, site, shots):
    url, root = site
    browser.get(f"{url}/datasets")
    form = browser.find_element(By.ID, "dataset-form")
    form.find_element(By.NAME, "name").send_keys("streets")
    form.find_element(By.NAME, "images").send_keys("data/images")
    form.find_element(By.NAME, "labels").send_keys("data/labels")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser, lambda d: d.current_url.endswith("/datasets/streets"))
    assert os.path.isfile(os.path.join(root, "datasets", "streets", "dataset.json"))
    legend = browser.find_elements(By.CSS_SELECTOR, "#dataset-legend tbody tr")
    assert len(legend) == 3
    samples = browser.find_elements(By.CSS_SELECTOR, "#samples img")
    assert samples
    wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#samples img, #distribution')].every(i => i.complete && i.naturalWidth > 0)"))
    screenshot(browser, shots, "dataset-page")


def test_import_a_model_from_a_store_on_localhost(browser, site, shots):
    url, root = site
    browser.get(f"{url}/models")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.store tbody tr")
    row = next(r for r in rows if r.find_element(By.TAG_NAME, "td").text == "fcn")
    name = row.find_element(By.NAME, "name")
    name.clear()
    name.send_keys("fcn-from-store")
    screenshot(browser, shots, "models-page")
    row.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser, lambda d: d.current_url.endswith("/models/fcn-from-store"))
    assert "Deconvolution" in browser.find_element(By.ID, "layer-table").text
    assert os.path.isfile(os.path.join(root, "models", "fcn-from-store", "weights.caffemodel"))
    screenshot(browser, shots, "imported-model")


def test_start_a_short_training_job_and_see_the_curve_grow(browser, site, shots, tmp_path):
    import numpy as np
    from selenium.webdriver.support.ui import Select

    from caffeish.apps import dataset as datasets

    url, root = site
    if not os.path.isdir(os.path.join(root, "datasets", "roads")):
        os.makedirs(os.path.join(root, "datasets"), exist_ok=True)
        datasets.build_segmentation(os.path.join(root, "data", "images"), os.path.join(root, "data", "labels"),
                                    os.path.join(root, "datasets", "roads"), val_fraction=0.34, workers=1)
    browser.get(f"{url}/models/fcn")
    browser.find_element(By.ID, "train-model").click()
    wait(browser, lambda d: "/jobs/new" in d.current_url)
    form = browser.find_element(By.ID, "job-form")
    form.find_element(By.NAME, "name").send_keys("roads-fcn")
    assert Select(form.find_element(By.NAME, "network")).first_selected_option.text.startswith("fcn")
    Select(form.find_element(By.NAME, "dataset")).select_by_value("roads")
    assert Select(form.find_element(By.NAME, "weights")).first_selected_option.get_attribute("value") == "model:fcn"
    for field, value in (("base_lr", "0.01"), ("max_iter", "100000"), ("display", "10"), ("test_interval", "500")):
        box = form.find_element(By.NAME, field)
        box.clear()
        box.send_keys(value)
    screenshot(browser, shots, "new-job")
    browser.find_element(By.ID, "job-submit").click()
    wait(browser, lambda d: d.current_url.endswith("/jobs/roads-fcn"))
    # the curve grows: the picture is fetched again with more points while the iteration count climbs
    curves = browser.find_element(By.ID, "job-curves")

    def points():
        return int(browser.execute_script("return +arguments[0].dataset.points", curves))

    wait(browser, lambda d: points() > 0)
    first, first_iteration = points(), int(browser.find_element(By.ID, "job-iteration").text)
    wait(browser, lambda d: points() > first + 5)
    assert int(browser.find_element(By.ID, "job-iteration").text) > first_iteration
    wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", curves))
    assert "Iteration" in browser.find_element(By.ID, "job-log").text
    assert browser.find_element(By.ID, "job-state").text == "running"
    screenshot(browser, shots, "job-running")
    # stop: a snapshot, the page shows the stopped job with it
    browser.find_element(By.ID, "job-stop").click()  # a POST, then the page again, reloaded when the job ends
    WebDriverWait(browser, 120, poll_frequency=0.1, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return (document.getElementById('job-state') || {}).textContent") == "stopped")
    rows = browser.find_elements(By.CSS_SELECTOR, "#job-snapshots tbody tr")
    assert len(rows) == 1 and browser.find_element(By.ID, "job-resume")
    screenshot(browser, shots, "job-stopped")
    # test one image with that snapshot
    image = tmp_path / "road.png"
    picture(np.random.default_rng(4), (24, 32)).save(image)
    browser.find_element(By.ID, "job-images").send_keys(str(image))
    browser.find_element(By.ID, "job-test-submit").click()
    wait(browser, lambda d: "/results/" in d.current_url)
    names = [r.find_elements(By.TAG_NAME, "td")[1].text for r in
             browser.find_elements(By.CSS_SELECTOR, "table.legend tbody tr")]
    with open(os.path.join(root, "datasets", "roads", "labels.txt")) as f:
        dataset_labels = f.read().split()
    assert names and all(n.split(" ", 1)[1] in dataset_labels for n in names)  # the dataset's class names
    assert "roads-fcn @ iteration" in browser.page_source
    screenshot(browser, shots, "job-test-result")
    browser.get(f"{url}/jobs")
    row = browser.find_element(By.CSS_SELECTOR, "#jobs-table tbody tr")
    assert row.find_element(By.TAG_NAME, "a").text == "roads-fcn" and "stopped" in row.text
    screenshot(browser, shots, "jobs-page")
