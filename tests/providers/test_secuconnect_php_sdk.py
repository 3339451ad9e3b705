"""secuconnect's official PHP SDK runs its documented flow against our served sandbox (#12).

The SDK (github.com/secuconnect/secuconnect-php-sdk, Apache-2.0) is not vendored: the
workplace forbids committing code fetched from other repositories, and Composer is not
reachable.  Point ``TXENGINE_SECUCONNECT_PHP_SDK`` at an installed SDK (a checkout with
``vendor/autoload.php``, or with its own ``autoload.php`` plus Debian's ``php-psr-log``
and ``php-psr-cache``).  PHP itself is installed by the fixture from Debian packages when
missing and we are root.  Otherwise the test skips and says exactly why.

The flow is the one on developer.secuconnect.com/integration/: client-credentials
token, ``addTransaction`` with a card ident, ``preTransaction`` (the answer the SDK reads
into ``SmartTransactionsPreTransactionModel``), ``startTransaction(..., "loyalty")``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from txengine.testing.sandbox import serve
from txengine.providers.secuconnect import SecuconnectSandbox
from txengine.providers.secuconnect.sandbox import DEMO_CARD_NUMBER

pytestmark = pytest.mark.slow

SDK_ENV = "TXENGINE_SECUCONNECT_PHP_SDK"
DEBIAN_PHP_PACKAGES = ("php-cli", "php-curl", "php-mbstring", "php-psr-log", "php-psr-cache")
DEBIAN_AUTOLOADS = ("/usr/share/php/Psr/Log/autoload.php", "/usr/share/php/Psr/Cache/autoload.php")

FLOW = r"""<?php
$sdk = getenv('SDK');
require file_exists("$sdk/vendor/autoload.php") ? "$sdk/vendor/autoload.php" : "$sdk/autoload.php";
foreach (explode(PATH_SEPARATOR, getenv('EXTRA_AUTOLOADS')) as $extra) { if ($extra && file_exists($extra)) require $extra; }
use Secuconnect\Client\Configuration;
use Secuconnect\Client\Authentication\Authenticator;
use Secuconnect\Client\Api\SmartTransactionsApi;
use Secuconnect\Client\Cache\FileCache;
$base = getenv('BASE');
Configuration::getDefaultConfiguration()->setHost("$base/api/v2")->setAuthHost("$base/");
Authenticator::setCache(new FileCache(getenv('CACHE')));
Authenticator::authenticateByClientCredentials(getenv('CLIENT_ID'), getenv('CLIENT_SECRET'));
$api = new SmartTransactionsApi();
$created = $api->addTransaction([
    'basket' => ['products' => [['id' => 1, 'articleNumber' => '3', 'ean' => '', 'desc' => 'Sandwich',
                                 'quantity' => 1, 'priceOne' => 349, 'tax' => 19]]],
    'basket_info' => ['sum' => 349, 'currency' => 'EUR'],
    'idents' => [['type' => 'card', 'value' => getenv('CARD')]],
]);
$pre = $api->preTransaction($created->getId());
$done = $api->startTransaction($created->getId(), 'loyalty', null);
echo json_encode(['id' => $created->getId(), 'missing_sum' => $pre->getMissingSum(),
                  'status' => $done->getStatus()]);
"""


@pytest.fixture(scope="module")
def php() -> str:
    found = shutil.which("php")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", *DEBIAN_PHP_PACKAGES], check=False,
                       capture_output=True, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("php")
    if found is None:
        pytest.skip("PHP is not installed and could not be installed from Debian packages (needs root and apt-get)")
    return found


@pytest.fixture(scope="module")
def sdk() -> Path:
    location = os.environ.get(SDK_ENV)
    if not location:
        pytest.skip(f"{SDK_ENV} is not set: the official PHP SDK is not vendored (no fetched code in this"
                    " repository) and Composer is unreachable; point it at an installed SDK to run this test")
    path = Path(location)
    if not (path / "vendor" / "autoload.php").is_file() and not (path / "autoload.php").is_file():
        pytest.skip(f"{SDK_ENV}={location} has neither vendor/autoload.php nor autoload.php")
    return path


def test_the_official_php_sdk_completes_the_documented_flow(php, sdk, tmp_path):
    sandbox = SecuconnectSandbox()
    script = tmp_path / "flow.php"
    script.write_text(FLOW)
    (tmp_path / "cache").mkdir()
    with serve(sandbox) as served:
        env = {**os.environ, "SDK": str(sdk), "BASE": f"http://{served.host}:{served.port}",
               "CACHE": str(tmp_path / "cache"), "CARD": DEMO_CARD_NUMBER,
               "EXTRA_AUTOLOADS": os.pathsep.join(DEBIAN_AUTOLOADS),
               "CLIENT_ID": sandbox.credentials()["client_id"],
               "CLIENT_SECRET": sandbox.credentials()["client_secret"]}
        ran = subprocess.run([php, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:] + ran.stdout[-2000:]
    result = json.loads(ran.stdout)
    assert result["missing_sum"] == 0 and result["status"] == "ok"
    assert sandbox.card_balance(DEMO_CARD_NUMBER) == 1000 - 349
