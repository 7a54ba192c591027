//! Route matching: which feature a request belongs to.

use crate::config::FeatureId;

/// How a route matches the request path (the query string is never part of the match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// A plain string prefix, as Envoy's route `prefix` (so `/v1/search` also matches
    /// `/v1/searchall`; end a prefix with `/` to match whole segments).
    Prefix(String),
}

/// The methods a route applies to; empty means every method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Methods(Vec<String>);

impl Methods {
    pub fn new(methods: Vec<String>) -> Self {
        Methods(methods)
    }

    fn allows(&self, method: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|m| m == method)
    }
}

/// What a matched route leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteTarget {
    /// A licensed feature: a license that lists it is needed.
    Feature(FeatureId),
    /// Served without a license.
    Public,
}

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub path: PathMatch,
    pub methods: Methods,
    pub target: RouteTarget,
}

/// Routes in configuration order; the first match wins.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        RouteTable { routes }
    }

    /// The target of the first route matching `method` and `path` (`:path`, query included).
    pub fn lookup(&self, method: &str, path: &str) -> Option<RouteTarget> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        self.routes
            .iter()
            .find(|route| {
                let path_matches = match &route.path {
                    PathMatch::Exact(p) => path == p,
                    PathMatch::Prefix(p) => path.starts_with(p.as_str()),
                };
                path_matches && route.methods.allows(method)
            })
            .map(|route| route.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new(vec![
            Route {
                path: PathMatch::Exact("/healthz".into()),
                methods: Methods::new(vec![]),
                target: RouteTarget::Public,
            },
            Route {
                path: PathMatch::Prefix("/v1/design/".into()),
                methods: Methods::new(vec!["POST".into()]),
                target: RouteTarget::Feature(1),
            },
            Route {
                path: PathMatch::Prefix("/v1/".into()),
                methods: Methods::new(vec![]),
                target: RouteTarget::Feature(0),
            },
        ])
    }

    #[test]
    fn exact_path_ignores_query_string() {
        assert_eq!(
            table().lookup("GET", "/healthz?verbose=1"),
            Some(RouteTarget::Public)
        );
        assert_eq!(table().lookup("GET", "/healthz/more"), None);
    }

    #[test]
    fn first_matching_route_wins_and_methods_filter() {
        let t = table();
        assert_eq!(
            t.lookup("POST", "/v1/design/run"),
            Some(RouteTarget::Feature(1))
        );
        // GET on the design prefix falls through to the broader /v1/ route.
        assert_eq!(
            t.lookup("GET", "/v1/design/run"),
            Some(RouteTarget::Feature(0))
        );
        assert_eq!(
            t.lookup("GET", "/v1/search?q=x"),
            Some(RouteTarget::Feature(0))
        );
    }

    #[test]
    fn unmatched_paths_have_no_target() {
        assert_eq!(table().lookup("GET", "/v2/search"), None);
        assert_eq!(table().lookup("GET", ""), None);
    }
}
