.PHONY: demo test package clean

demo:     ## the local end-to-end story (Azurite + IMDS simulator + eviction)
	bash scripts/demo.sh

test:     ## the test suite, as CI runs it
	bash scripts/test.sh

package:  ## the VM Application package (dist/spot-supervisor-<version>.tar.gz)
	bash packaging/build.sh --out dist

clean:
	rm -rf dist build *.egg-info .pytest_cache
