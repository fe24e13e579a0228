"""Federated training across sites (Flower): what travels between the server and
the sites, and (as it lands) the ServerApp / ClientApp that run mimjax's own `Run`
at every site."""
