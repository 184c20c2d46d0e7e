"""The simulated factory (stock, camera renderer, MQTT publishing, labelled datasets)
and the MQTT broker wrapper: what `make run` and the tests use in place of the real plant."""
