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

/// The HTTP methods a route may name (RFC 9110 section 9, and PATCH from RFC 5789).
pub const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

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

    /// The methods named; empty means every method.
    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// Every method.
    pub fn is_any(&self) -> bool {
        self.0.is_empty()
    }
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        }
    }

    /// Every path `other` matches, this matches too.
    pub fn covers(&self, other: &PathMatch) -> bool {
        match (self, other) {
            (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
            (PathMatch::Exact(_), PathMatch::Prefix(_)) => false,
            (PathMatch::Prefix(a), PathMatch::Exact(b) | PathMatch::Prefix(b)) => {
                b.starts_with(a.as_str())
            }
        }
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

/// What [`RouteTable::lookup_path`] could tell from the path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRoute {
    /// The target (`None`: no route serves the path), whatever the method.
    Found(Option<RouteTarget>),
    /// A route naming methods matches first: the method decides.
    NeedsMethod,
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
            .find(|route| route.path.matches(path) && route.methods.allows(method))
            .map(|route| route.target)
    }

    /// The route of `path` found without its method, so that the adapter saves the `:method`
    /// read (a host call) where no route names methods; `NeedsMethod` when a route naming
    /// methods matches the path first (then [`RouteTable::lookup`] with the method decides).
    pub fn lookup_path(&self, path: &str) -> PathRoute {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        match self.routes.iter().find(|r| r.path.matches(path)) {
            Some(route) if !route.methods.is_any() => PathRoute::NeedsMethod,
            route => PathRoute::Found(route.map(|r| r.target)),
        }
    }

    /// The methods the routes matching `path` take, in configuration order without repeats
    /// (for `Allow`). Empty when no route serves the path; never asked when one takes every
    /// method, since that one would have matched.
    pub fn allowed_methods(&self, path: &str) -> Vec<&str> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let mut methods: Vec<&str> = Vec::new();
        for route in self.routes.iter().filter(|r| r.path.matches(path)) {
            for method in route.methods.names() {
                if !methods.contains(&method.as_str()) {
                    methods.push(method);
                }
            }
        }
        methods
    }

    /// The routes in configuration order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
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
    fn a_path_served_for_other_methods_lists_them() {
        let t = RouteTable::new(vec![
            Route {
                path: PathMatch::Prefix("/v1/design/".into()),
                methods: Methods::new(vec!["POST".into(), "PUT".into()]),
                target: RouteTarget::Feature(1),
            },
            Route {
                path: PathMatch::Exact("/v1/design/run".into()),
                methods: Methods::new(vec!["PUT".into(), "DELETE".into()]),
                target: RouteTarget::Feature(0),
            },
        ]);
        assert_eq!(t.lookup("GET", "/v1/design/run"), None);
        assert_eq!(
            t.allowed_methods("/v1/design/run?x=1"),
            vec!["POST", "PUT", "DELETE"]
        );
        assert_eq!(t.allowed_methods("/v1/design/other"), vec!["POST", "PUT"]);
        assert!(t.allowed_methods("/v2/").is_empty());
    }

    #[test]
    fn prefixes_cover_longer_prefixes_and_exact_paths() {
        let prefix = PathMatch::Prefix("/v1/".into());
        assert!(prefix.covers(&PathMatch::Prefix("/v1/search".into())));
        assert!(prefix.covers(&PathMatch::Exact("/v1/search".into())));
        assert!(!prefix.covers(&PathMatch::Prefix("/v".into())));
        assert!(!PathMatch::Exact("/v1/".into()).covers(&PathMatch::Prefix("/v1/".into())));
        assert!(PathMatch::Exact("/a".into()).covers(&PathMatch::Exact("/a".into())));
    }

    #[test]
    fn unmatched_paths_have_no_target() {
        assert_eq!(table().lookup("GET", "/v2/search"), None);
        assert_eq!(table().lookup("GET", ""), None);
    }
}
